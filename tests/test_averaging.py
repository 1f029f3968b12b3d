"""Averaged weights (--ema): scored beside the trained weights at every evaluation, the better one saved as the
model, part of the exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chargpt.storage import checkpoint as ckpt
from chargpt.training.loop import train
from chargpt.training.settings import resume_config
from conftest import tiny_config
from helpers import assert_one_line_error, assert_same_tensors, call_main, final_state, metrics, small


def _evals(out: Path) -> list[dict]:
    return [m for m in metrics(out) if m["kind"] == "eval"]


def test_the_average_of_noisy_weights_scores_better_and_is_the_model_saved(text_file: Path, tmp_path: Path):
    """What a user wants from averaging: at a learning rate that never decays, the weights jump about a minimum;
    their moving average sits nearer it and scores better, and that average is what the run saves (its weights
    are the average's, bit for bit, and config.json says which weights they are)."""
    out = tmp_path / "run"
    cfg = tiny_config(
        out, text_file, n_updates=120, learning_rate=1e-2, schedule="wsd", decay_fraction=0.0, warmup_updates=5,
        eval_interval=40, ema=0.9,
    )  # fmt: skip
    result = train(cfg, progress=False)
    evals = _evals(out)
    assert "ema_val_loss" not in evals[0]  # step 0: nothing averaged yet
    last = evals[-1]
    assert last["step"] == 120 and last["ema_val_loss"] < last["val_loss"] - 0.01, last
    saved = json.loads((out / "config.json").read_text())["info"]
    assert saved["step"] == 120 and saved["val_loss"] == last["ema_val_loss"] == result.best_val_loss
    assert saved["weights"].startswith("an exponential moving average")
    state = final_state(out)
    assert state["average_steps"] == 120
    assert_same_tensors(ckpt.load_model(out)[0].state_dict(), state["average"])
    # the run goes on from the weights as trained, not from their average
    assert any(not torch.equal(state["model"][k], state["average"][k]) for k in state["average"])


def test_the_trained_weights_are_saved_where_they_score_better(text_file: Path, tmp_path: Path):
    """Where the average lags behind a model still learning fast (early in a run), the weights as trained win, and
    the saved model is theirs."""
    out = tmp_path / "run"
    train(tiny_config(out, text_file, n_updates=20, eval_interval=20, ema=0.9), progress=False)
    last = _evals(out)[-1]
    assert last["val_loss"] < last["ema_val_loss"], last
    info = json.loads((out / "config.json").read_text())["info"]
    assert info["weights"] == "as trained" and info["val_loss"] == last["val_loss"]
    assert_same_tensors(ckpt.load_model(out)[0].state_dict(), final_state(out)["model"])


def test_averaged_weights_resume_bit_identical(text_file: Path, tmp_path: Path):
    settings = dict(n_updates=24, schedule="wsd", decay_fraction=0.5, ema=0.8)
    reference = tmp_path / "reference"
    train(small(reference, text_file, **settings), progress=False)
    out = tmp_path / "paused"
    train(small(out, text_file, **settings), progress=False, pause_after=14)
    assert final_state(out)["average_steps"] == 14
    train(resume_config(str(out)), resume=True, progress=False)
    ref, got = final_state(reference), final_state(out)
    assert got["average_steps"] == ref["average_steps"] == 24
    for part in ("model", "optimizer", "rng", "average"):
        assert_same_tensors(ref[part], got[part], part)
    assert metrics(out) == metrics(reference)
    assert all("ema_val_loss" in m for m in _evals(out) if m["step"] > 0)
    assert_same_tensors(ckpt.load_model(out)[0].state_dict(), ckpt.load_model(reference)[0].state_dict())


def test_a_resume_without_ema_drops_the_average(text_file: Path, tmp_path: Path):
    out = tmp_path / "run"
    train(small(out, text_file, n_updates=10, ema=0.8), progress=False)
    train(resume_config(out, n_updates=20, ema=0.0), resume=True, progress=False)
    state = final_state(out)
    assert "average" not in state and state["average_steps"] == 0
    assert all("ema_val_loss" not in m for m in _evals(out) if m["step"] > 10)


@pytest.mark.parametrize("value", ["1", "-0.5", "nan"])
def test_an_ema_outside_0_1_is_a_one_line_error(tmp_path: Path, capsys, value: str):
    rc, out, err = call_main(["train", "--out", str(tmp_path / "m"), "--n-updates", "1", "--ema", value], capsys)
    assert_one_line_error(rc, out, err, "ema must be in [0, 1)")
    assert not (tmp_path / "m").exists()


def test_a_train_state_whose_average_does_not_fit_is_a_one_line_error(text_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    train(small(out, text_file, n_updates=6, ema=0.8), progress=False)
    state = final_state(out)
    name = next(iter(state["average"]))
    state["average"][name] = torch.zeros(3)  # another shape than the model's
    torch.save(state, out / "train_state.pt")
    capsys.readouterr()  # what the first run logged
    rc, stdout, err = call_main(["train", "--resume", str(out), "--n-updates", "12"], capsys)
    assert_one_line_error(rc, stdout, err, "averaged-weights state this run cannot use")
    assert f"averaged weight {name} does not match" in err


def test_a_train_state_whose_average_is_not_finite_is_a_one_line_error(text_file: Path, tmp_path: Path, capsys):
    """NaN averaged weights would resume silently and be scored, and saved, as a model: the state is refused."""
    out = tmp_path / "run"
    train(small(out, text_file, n_updates=6, ema=0.8), progress=False)
    state = final_state(out)
    name = next(iter(state["average"]))
    state["average"][name] = torch.full_like(state["average"][name], float("nan"))
    torch.save(state, out / "train_state.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()  # what the first run logged
    rc, stdout, err = call_main(["train", "--resume", str(out), "--n-updates", "12"], capsys)
    assert_one_line_error(rc, stdout, err, f"averaged weight {name} holds NaN or infinite values")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".chargpt.lock"} == before
