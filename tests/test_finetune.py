"""--init-from: a new run that starts from a trained model's weights, on new text with new characters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chargpt.cli import main
from chargpt.inference.evaluate import evaluate
from chargpt.storage import checkpoint as ckpt
from chargpt.training import finetune
from chargpt.training.loop import train
from chargpt.training.settings import make_train_config, resume_config
from conftest import tiny_config
from helpers import assert_same_tensors, final_state, metrics

# a text in another style, with three characters Shakespeare's plays lack
NEW = "".join(
    f"Dear diary, day {i}: the café was naïve about the señor's résumé; we walked and talked of {w}.\n"
    for i, w in zip(range(900), ["rain", "sun", "trains", "letters", "gardens"] * 200, strict=False)
)


@pytest.fixture
def new_text(tmp_path: Path) -> Path:
    path = tmp_path / "diary.txt"
    path.write_text(NEW, encoding="utf-8")
    return path


def tune(out: Path, source: Path, data: Path, **kw):
    """A fine-tune config as make_train_config builds it (the source's shape), with the tests' pins."""
    values = dict(device="cpu", precision="fp32", threads=1, n_updates=20, eval_interval=10, eval_iters=4)
    values.update(checkpoint_interval=10, batch_size=16, seed=3, **kw)
    return make_train_config("cpu", None, init_from=str(source), data=str(data), out=str(out), **values)


def test_new_characters_get_new_rows_and_the_old_logits_are_unchanged(trained_model_dir, new_text):
    cfg = tune(Path("unused"), trained_model_dir, new_text)
    source, old = ckpt.load_model(trained_model_dir)
    begin = finetune.start(cfg)
    finetune.extend(begin, sorted(set(NEW)))
    assert sorted(begin.added) == sorted(set(NEW) - set(old.chars)) and {"é", "ï", "ñ"} <= set(begin.added)
    assert begin.tokenizer.chars[: old.vocab_size] == old.chars  # old ids unchanged
    torch.manual_seed(cfg.seed)
    from chargpt.model import build_model

    model = build_model(cfg.model_config(begin.tokenizer.vocab_size))
    finetune.load_into(model, begin)
    model.eval()
    prompt = torch.as_tensor(old.encode("ROMEO:\nWhat light"))[None]
    with torch.no_grad():
        before, after = source(prompt)[0], model(prompt)[0]
    assert after.shape[-1] == begin.tokenizer.vocab_size > before.shape[-1]
    assert torch.equal(after[..., : old.vocab_size], before)  # exactly the old model's, before any step


def test_a_fine_tune_learns_the_new_text_and_records_where_it_started(trained_model_dir, new_text, tmp_path):
    out = tmp_path / "tuned"
    result = train(tune(out, trained_model_dir, new_text, n_updates=60, eval_interval=30), progress=False)
    source, old = ckpt.load_model(trained_model_dir)
    model, tok = ckpt.load_model(out)
    plain = "".join(c for c in NEW[-3000:] if c in set(old.chars))  # scorable by both models
    assert (
        evaluate(model, tok, plain, precision="fp32")["loss"]
        < evaluate(source, old, plain, precision="fp32")["loss"] - 0.3
    )
    config = json.loads((out / "config.json").read_text())
    origin = config["info"]["init_from"]
    assert origin["path"] == str(trained_model_dir.resolve()) and origin["step"] > 0 and origin["val_loss"] > 0
    assert config["info"]["train_config"]["learning_rate"] == pytest.approx(3e-3 / 3)  # the gentler default
    assert result.best_val_loss < 3.0


def test_a_fine_tune_resumes_bit_for_bit(trained_model_dir, new_text, tmp_path):
    train(tune(tmp_path / "once", trained_model_dir, new_text), progress=False)
    paused = tmp_path / "paused"
    train(tune(paused, trained_model_dir, new_text), progress=False, pause_after=10)
    train(resume_config(paused), resume=True, progress=False)
    a, b = final_state(tmp_path / "once"), final_state(paused)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"])
    assert metrics(tmp_path / "once") == metrics(paused)


def test_conflicting_shape_and_bad_sources_are_one_line(trained_model_dir, new_text, tmp_path, capsys):
    base = ["train", "--data", str(new_text), "--out", str(tmp_path / "o")]
    cases = {
        "a fine-tune keeps the model's shape": ["--init-from", str(trained_model_dir), "--n-embd", "64"],
        "holds no model": ["--init-from", str(tmp_path)],
        "same folder": ["--init-from", str(trained_model_dir), "--out", str(trained_model_dir)],
        "--vocab cannot be combined": ["--init-from", str(trained_model_dir), "--vocab", str(new_text)],
    }
    for words, extra in cases.items():
        rc = main([*base, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and err.count("\n") == 1, (words, err)
    assert not (tmp_path / "o").exists()
    # the same shape given explicitly is fine
    cfg = tiny_config(tmp_path / "x", new_text)
    assert make_train_config(None, None, init_from=str(trained_model_dir), n_embd=48, device="cpu").n_embd == cfg.n_embd


def test_many_new_characters_name_min_char_count(trained_model_dir, caplog):
    """A fine-tune that would add hundreds of characters (code, another script) says --min-char-count exists;
    a few new characters (NEW's three) do not."""
    import logging

    cfg = tune(Path("unused"), trained_model_dir, Path("unused.txt"))
    many = [chr(0x400 + i) for i in range(300)]
    for chars, hinted in ((many, True), (sorted(set(NEW)), False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="chargpt"):
            finetune.extend(finetune.start(cfg), chars)
        assert "added to its vocabulary" in caplog.text
        assert ("--min-char-count N maps the characters seen fewer than N times" in caplog.text) == hinted


def test_a_budgeted_fine_tune_spaces_its_evaluations_for_a_learning_curve(trained_model_dir, new_text):
    """A 120 s fine-tune evaluated every 500 steps drew two points: with a time budget its evaluations are spaced
    as a sized run's, from the source run's measured speed; a given interval is kept."""
    from chargpt.training import sizing
    from chargpt.training.settings import new_run

    speed = finetune.source_speed(trained_model_dir)
    assert speed is not None and speed > 0
    budget = 10  # seconds: this tiny source model trains ~100 steps a second
    settings = new_run("cpu", None, init_from=str(trained_model_dir), data=str(new_text), out="unused", max_time=budget)
    cfg = settings.config
    steps = budget * speed / (cfg.batch_size * cfg.block_size)
    assert (cfg.eval_interval, cfg.eval_iters) == tuple(sizing.evaluation(steps).values())
    assert cfg.eval_interval < 500 and steps / cfg.eval_interval >= 5  # a curve, not two points
    assert settings.sources["eval_interval"] == "fine-tuning defaults"
    given = new_run("cpu", None, init_from=str(trained_model_dir), data=str(new_text), out="unused",
                    max_time=budget, eval_interval=7).config  # fmt: skip
    assert given.eval_interval == 7
