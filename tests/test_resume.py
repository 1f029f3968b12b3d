"""Exact resume, the NaN guard, and the --out safety checks (refuse to clobber, unwritable, disk full)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chargpt.errors import ChargptError
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import layout, trainstate
from chargpt.training.loop import train
from chargpt.training.settings import resume_config
from conftest import run_cli, tiny_config
from helpers import FLAGS, assert_same_tensors, final_state, metrics, small


def snapshot(d: Path, names=("model.safetensors", "config.json", "train_state.pt")) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in names if (d / n).exists()}


@pytest.fixture(scope="module")
def reference(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 uninterrupted steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train(small(out, text_file, n_updates=24), progress=False)
    assert result.stopped_by == "n_updates" and result.step == 24
    return out


def test_pause_and_resume_is_bit_identical(reference: Path, text_file: Path, tmp_path: Path):
    out = tmp_path / "run"
    first = train(small(out, text_file, n_updates=24), progress=False, pause_after=12)
    assert (first.stopped_by, first.step) == ("pause", 12)
    evals = [m["step"] for m in metrics(out) if m["kind"] == "eval"]
    assert evals == [0, 5, 10]  # an interruption does not evaluate
    assert [m["step"] for m in metrics(out) if m["kind"] == "train"] == [10]  # log_interval 10
    second = train(resume_config(str(out)), resume=True, progress=False)
    assert (second.stopped_by, second.step) == ("n_updates", 24)
    ref, got = final_state(reference), final_state(out)
    assert got["step"] == ref["step"] == 24 and got["best_val_loss"] == ref["best_val_loss"]
    for part in ("model", "optimizer", "rng"):
        assert_same_tensors(ref[part], got[part], part)
    assert metrics(out) == metrics(reference)
    assert_same_tensors(ckpt.load_model(out)[0].state_dict(), ckpt.load_model(reference)[0].state_dict())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if m["kind"] == "resume"] == [12]  # the one mark loss.png draws
    assert [m for m in rows if m["kind"] == "resume"][0]["time"] > 0
    assert (out / "loss.png").stat().st_size > 0


def test_shuffled_windows_resume_bit_identical(text_file: Path, tmp_path: Path):
    """window_order "shuffled" (what sized runs use): paused at 9 of 20 steps and resumed, the run ends as the
    uninterrupted one, weights, optimizer and metrics bit for bit; and its windows are not random windows'."""
    runs = {}
    for name, order, pause in (("ref", "shuffled", None), ("run", "shuffled", 9), ("random", "random", None)):
        cfg = small(tmp_path / name, text_file, n_updates=20, window_order=order)
        train(cfg, progress=False, pause_after=pause)
        if pause:
            train(resume_config(str(tmp_path / name)), resume=True, progress=False)
        runs[name] = final_state(tmp_path / name)
    assert runs["run"]["step"] == runs["ref"]["step"] == 20
    for part in ("model", "optimizer"):
        assert_same_tensors(runs["ref"][part], runs["run"][part], part)
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")
    assert any(not torch.equal(runs["ref"]["model"][k], runs["random"]["model"][k]) for k in runs["ref"]["model"])


def test_resume_depends_on_the_saved_rng(reference: Path, text_file: Path, tmp_path: Path):
    """The check above has teeth: with another dropout RNG state the resumed run ends elsewhere."""
    out = tmp_path / "run"
    train(small(out, text_file, n_updates=24), progress=False, pause_after=12)
    state = final_state(out)
    state["rng"]["torch"] = torch.Generator().manual_seed(123).get_state()
    trainstate.save_train_state(out, trainstate.TrainState.from_dict(state))
    train(resume_config(str(out)), resume=True, progress=False)
    ref, got = final_state(reference)["model"], final_state(out)["model"]
    assert any(not torch.equal(ref[k], got[k]) for k in ref)


def test_nan_guard_names_the_step_and_keeps_the_best_model(reference: Path, tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    for name, data in snapshot(reference).items():
        (out / name).write_bytes(data)
    before = snapshot(out, ("model.safetensors", "config.json"))  # the best model (the state moves on)
    r = run_cli("train", "--resume", str(out), "--n-updates", "60", "--learning-rate", "1e30", "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("chargpt: error: the loss became") and r.stderr.count("\n") == 1, r.stderr
    assert int(re.search(r"at step (\d+)", r.stderr).group(1)) > 24  # the resumed run's own step count
    assert "lower --learning-rate" in r.stderr and "best model" in r.stderr
    assert snapshot(out, ("model.safetensors", "config.json")) == before


def test_nan_guard_in_a_fresh_run(text_file: Path, tmp_path: Path):
    with pytest.raises(ChargptError, match=r"at step \d+; training stopped and nothing was saved.*learning-rate"):
        train(small(tmp_path / "run", text_file, learning_rate=1e30, n_updates=10), progress=False)


def test_out_holding_another_model_is_refused(reference: Path, text_file: Path, tmp_path: Path):
    before = snapshot(reference) | {"metrics.jsonl": (reference / "metrics.jsonl").read_bytes()}
    r = run_cli("train", "--data", str(text_file), "--out", str(reference), "--n-updates", "5", *FLAGS)
    assert r.returncode == 2 and "already holds a model" in r.stderr, r.stderr
    assert "--overwrite" in r.stderr and "--resume" in r.stderr and r.stderr.count("\n") == 1
    assert snapshot(reference) | {"metrics.jsonl": (reference / "metrics.jsonl").read_bytes()} == before


def test_overwrite_replaces_the_model_and_drops_the_old_state(reference: Path, text_file: Path, tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    for name, data in snapshot(reference).items():
        (out / name).write_bytes(data)
    train(small(out, text_file, n_updates=3, n_embd=16, checkpoint_interval=50), overwrite=True, progress=False)
    model, _ = ckpt.load_model(out)
    assert model.config.n_embd == 16 and final_state(out)["step"] == 3


def test_unwritable_out_fails_before_training(text_file: Path, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = run_cli("train", "--data", str(text_file), "--out", str(blocker / "model"), *FLAGS)
    assert r.returncode == 2 and "cannot write to" in r.stderr and "--out" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and blocker.read_text() == "not a directory"


def test_hostile_train_state_is_never_unpickled(reference: Path, tmp_path: Path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    out = tmp_path / "run"
    out.mkdir()
    for name, data in snapshot(reference).items():
        (out / name).write_bytes(data)
    for payload in (pickle.dumps(Evil()), None):
        if payload is None:
            torch.save({"step": 1, "model": Evil()}, out / layout.TRAIN_STATE)  # the zip format torch writes
        else:
            (out / layout.TRAIN_STATE).write_bytes(payload)
        before = snapshot(out)
        r = run_cli("train", "--resume", str(out), "--quiet")
        assert r.returncode == 2 and "train_state.pt is corrupt or not a chargpt train state" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and not marker.exists() and snapshot(out) == before
    with pytest.raises(ChargptError, match="not a usable chargpt train state"):
        torch.save({"step": 3, "model": {}}, out / layout.TRAIN_STATE)  # loadable, but not what resuming needs
        train(resume_config(str(out)), resume=True, progress=False)


def test_disk_full_during_a_resumed_run(reference: Path, text_file: Path, tmp_path: Path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 4 kB (EFBIG), as a full disk refuses with ENOSPC."""
    out = tmp_path / "run"
    out.mkdir()
    for name, data in snapshot(reference).items():
        (out / name).write_bytes(data)
    before = snapshot(out)
    launcher = textwrap.dedent(
        """
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from chargpt.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    args = ["train", "--resume", str(out), "--n-updates", "30", "--quiet"]
    r = subprocess.run([sys.executable, "-c", launcher, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "file-size limit" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert snapshot(out) == before and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    ckpt.load_model(out)


def _train_rows(out: Path) -> list[dict]:
    return [m for m in metrics(out) if m["kind"] == "train"]


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_a_larger_budget_trains_on_and_ends_better(text_file: Path, tmp_path: Path, schedule: str):
    """The user's "train longer": a finished run resumed with three times the steps trains at a real learning rate
    and ends with a lower best val loss. WSD goes back to the state from where its decay began (no decay wasted,
    no re-warm-up); cosine climbs back to its peak over a short ramp and decays again. Resuming the longer run
    after a pause is still bit-exact."""
    settings = dict(n_updates=60, warmup_updates=5, eval_interval=20, schedule=schedule, decay_fraction=0.3)
    runs = {}
    first = tmp_path / f"{schedule}-short"
    short = train(tiny_config(first, text_file, **settings), progress=False)
    assert (first / layout.STABLE_STATE).exists() == (schedule == "wsd")
    for name in ("once", "paused"):
        out = tmp_path / f"{schedule}-{name}"
        shutil.copytree(first, out)  # the same finished short run, extended twice
        longer = resume_config(out, n_updates=180)
        if name == "paused":
            train(longer, resume=True, progress=False, pause_after=30)
            longer = resume_config(out, n_updates=180)
        result = train(longer, resume=True, progress=False)
        runs[name] = (final_state(out), metrics(out), short, result)
    (state, rows, short, result), paused = runs["once"], runs["paused"]
    assert_same_tensors(state["model"], paused[0]["model"])
    assert rows == paused[1]
    assert result.best_val_loss < short.best_val_loss - 0.02, (short.best_val_loss, result.best_val_loss)
    peak, floor = 3e-3, 3e-3 * 0.1
    lrs = {m["step"]: m["lr"] for m in rows if m["kind"] == "train"}
    if schedule == "wsd":  # flat from step 43 (where the 60-step run's decay began) to 70% of 180, then down
        assert state.get("lr_anchor") is None and min(s for s in lrs if s > 40) == 50  # steps 43-60 were dropped
        assert all(lrs[s] == peak for s in lrs if 40 < s <= 126) and lrs[180] == pytest.approx(floor, rel=0.2)
    else:  # back up to the peak, then cosine down to the floor
        assert state["lr_anchor"][0] == 60 and max(lrs[s] for s in lrs if s > 60) == pytest.approx(peak, rel=0.05)
        assert lrs[180] == pytest.approx(floor, rel=0.2)


def test_the_readme_train_longer_step_trains(text_file: Path, tmp_path: Path, capsys):
    """`chargpt train --max-time S` then `chargpt train --resume DIR --max-time 2S`, as the README says: every
    step after the resume has a learning rate above zero, and the resumed run's best val loss is lower, at any
    speed. Where the first run reached its final decay (it saved the state from there), the announcement says it
    goes back to it; on a machine so busy that the run ended before its decay, there is nothing to go back over.
    (test_a_larger_budget_trains_on_and_ends_better[wsd] covers going back with step budgets.)"""
    from helpers import call_main

    out = tmp_path / "run"
    shape = ["--n-embd=48", "--n-heads=4", "--n-layers=2", "--block-size=32", "--batch-size=16", "--eval-iters=4"]
    common = ["--device=cpu", "--threads=1", "--precision=fp32", "--eval-interval=50", "--quiet"]
    rc, _, err = call_main(["train", "--data", str(text_file), "--out", str(out), "--max-time", "4",
                            "--schedule", "wsd", *shape, *common], capsys)  # fmt: skip
    assert rc == 0, err
    first = json.loads((out / "config.json").read_text())["info"]["val_loss"]
    decayed = (out / layout.STABLE_STATE).exists()
    rc, _, err = call_main(["train", "--resume", str(out), "--max-time", "9", "--eval-interval=50"], capsys)
    assert rc == 0, err
    assert ("going back to step" in err) == decayed, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed_at = [m["step"] for m in rows if m["kind"] == "resume"][-1]
    after = [m["lr"] for m in rows if m["kind"] == "train" and m["step"] > resumed_at]
    assert after and min(after) > 0, after
    second = json.loads((out / "config.json").read_text())["info"]["val_loss"]
    assert second < first, (first, second)


def test_a_damaged_stable_state_still_trains_longer(text_file: Path, tmp_path: Path):
    """stable_state.pt unreadable (here: overwritten with other bytes): the larger budget resumes from the end
    state instead, the rate climbing back to its peak, and the run trains on (it does not refuse the folder)."""
    out = tmp_path / "run"
    short = train(tiny_config(out, text_file, n_updates=60, warmup_updates=5, eval_interval=20, schedule="wsd"),
                  progress=False)  # fmt: skip
    (out / layout.STABLE_STATE).write_bytes(b"not a train state")
    result = train(resume_config(out, n_updates=120), resume=True, progress=False)
    assert result.step == 120 and result.best_val_loss < short.best_val_loss
    state = final_state(out)
    assert state["lr_anchor"][0] == 60  # went on from the end, re-warmed
    assert min(m["lr"] for m in metrics(out) if m["kind"] == "train" and m["step"] > 60) > 0


def test_a_resume_from_an_older_state_never_replaces_a_better_model(text_file: Path, tmp_path: Path):
    """A run extended to 120 steps saves its model there and is killed before its next checkpoint (its
    train_state.pt still the one of step 20). A later resume to 40 steps must beat the model on disk, not the old
    state's best: the better model stays, and the run's summary, metrics.jsonl and samples.txt name it."""
    out = tmp_path / "run"
    train(small(out, text_file, n_updates=20, checkpoint_interval=20), progress=False)
    early = (out / layout.TRAIN_STATE).read_bytes()
    train(resume_config(out, n_updates=120, checkpoint_interval=1000), resume=True, progress=False)
    saved = json.loads((out / layout.CONFIG).read_text())["info"]
    assert saved["step"] == 120
    kept = snapshot(out, (layout.WEIGHTS, layout.CONFIG))
    (out / layout.TRAIN_STATE).write_bytes(early)  # as a kill before the state of step 120 was written leaves it
    result = train(resume_config(out, n_updates=40), resume=True, progress=False)
    assert result.step == 40
    assert snapshot(out, (layout.WEIGHTS, layout.CONFIG)) == kept  # no worse model replaced it
    assert (result.best_step, result.best_val_loss) == (120, saved["val_loss"])
    rows = [m for m in metrics(out) if m["kind"] == "eval"]
    assert [m["val_loss"] for m in rows if m["step"] == 120] == [saved["val_loss"]]
    assert all(m["val_loss"] > saved["val_loss"] for m in rows if m["step"] <= 40)  # the branch did worse
    assert "=== step 120," in (out / layout.SAMPLES).read_text()


def test_a_model_without_a_train_state_is_kept_and_the_advice_keeps_it(text_file: Path, tmp_path: Path, capsys):
    """Killed after its best model was saved but before its first resumable state: --resume and a new run on the
    folder both name a way to train on that keeps the model (--init-from into another folder), which works."""
    from helpers import call_main

    out = tmp_path / "k9"
    train(small(out, text_file, n_updates=10, checkpoint_interval=1000), progress=False)
    (out / layout.TRAIN_STATE).unlink()  # as a kill before the run's first resumable save leaves it
    kept = snapshot(out, (layout.WEIGHTS, layout.CONFIG))
    capsys.readouterr()  # what the run logged
    for argv in (["train", "--resume", str(out)], ["train", "--data", str(text_file), "--out", str(out), *FLAGS]):
        rc, stdout, err = call_main(argv, capsys)
        assert rc == 2 and stdout == "" and err.count("\n") == 1, err
        assert f"--init-from {out} --out {out}-more" in err and "no train_state.pt" in err, err
    assert snapshot(out, (layout.WEIGHTS, layout.CONFIG)) == kept
    more = f"{out}-more"
    argv = ["train", "--init-from", str(out), "--out", more, "--data", str(text_file), "--n-updates=5", *FLAGS]
    rc, _, err = call_main(argv, capsys)
    assert rc == 0, err
    assert json.loads(Path(more, layout.CONFIG).read_text())["info"]["init_from"]["path"] == str(out)
    assert snapshot(out, (layout.WEIGHTS, layout.CONFIG)) == kept


def test_a_clock_governed_run_resumed_without_a_budget_or_with_more_steps(text_file: Path, tmp_path: Path, capsys):
    """A run governed by --max-time alone has no step count: `--resume --max-time 0` (no time limit) is refused
    instead of training for ever; a finished one resumed with more steps is told which budget to grow, and
    following that advice trains."""
    from helpers import call_main

    out = tmp_path / "clock"
    shape = ["--n-embd=32", "--n-heads=4", "--n-layers=2", "--block-size=16", "--batch-size=8", "--eval-iters=2"]
    common = ["--device=cpu", "--threads=1", "--precision=fp32", "--quiet"]
    rc, _, err = call_main(["train", "--data", str(text_file), "--out", str(out), "--max-time", "2", *shape,
                            *common], capsys)  # fmt: skip
    assert rc == 0, err
    before = snapshot(out)
    rc, stdout, err = call_main(["train", "--resume", str(out), "--max-time", "0"], capsys)
    assert rc == 2 and stdout == "" and err.count("\n") == 1 and "no budget" in err and "--n-updates" in err, err
    assert snapshot(out) == before
    steps = final_state(out)["step"]
    rc, stdout, err = call_main(["train", "--resume", str(out), "--n-updates", "50000"], capsys)
    assert rc == 0 and "already finished" in stdout, (stdout, err)
    advice = re.search(r"train --resume \S+ (.*)$", stdout.strip()).group(1).split()
    assert "--max-time" in advice, stdout
    rc, stdout, err = call_main(["train", "--resume", str(out), "--n-updates", "50000", *advice], capsys)
    assert rc == 0 and "already finished" not in stdout, (stdout, err)
    assert final_state(out)["step"] > steps


def test_a_stable_state_from_another_run_is_refused(text_file: Path, tmp_path: Path, capsys):
    """stable_state.pt (where a WSD run's decay began) carries its run's identity, as train_state.pt does: one
    copied in from another run is a one-line error, never the start of this run's longer budget."""
    from helpers import call_main

    settings = dict(n_updates=30, warmup_updates=5, eval_interval=10, schedule="wsd", decay_fraction=0.3)
    mine, other = tmp_path / "mine", tmp_path / "other"
    train(tiny_config(mine, text_file, **settings), progress=False)
    train(tiny_config(other, text_file, **settings), progress=False)
    states = [trainstate.load_train_state(mine, name=n) for n in (layout.TRAIN_STATE, layout.STABLE_STATE)]
    assert states[0].run_id and states[0].run_id == states[1].run_id
    shutil.copyfile(other / layout.STABLE_STATE, mine / layout.STABLE_STATE)
    before = snapshot(mine)
    capsys.readouterr()  # what the runs logged
    rc, stdout, err = call_main(["train", "--resume", str(mine), "--n-updates", "60"], capsys)
    assert rc == 2 and stdout == "" and err.count("\n") == 1 and "belongs to another run" in err, err
    assert snapshot(mine) == before


def test_a_resume_says_what_it_adds_and_add_time_is_seconds_more(text_file: Path, tmp_path: Path, capsys):
    """A budget is the run's total: the resume's first lines say how much this call adds, and --add-time S
    trains S seconds more than the run has done (the run's --max-time becomes its seconds done + S)."""
    from helpers import call_main

    out = tmp_path / "run"
    shape = ["--n-embd=32", "--n-heads=4", "--n-layers=2", "--block-size=16", "--batch-size=8", "--eval-iters=2"]
    common = ["--device=cpu", "--threads=1", "--precision=fp32"]
    rc, _, err = call_main(["train", "--data", str(text_file), "--out", str(out), "--max-time", "2", *shape,
                            *common, "--quiet"], capsys)  # fmt: skip
    assert rc == 0, err
    done = final_state(out)
    rc, _, err = call_main(["train", "--resume", str(out), "--add-time", "2"], capsys)
    assert rc == 0, err
    adds = re.search(r"this resume adds about (\d+) s \(([\d,]+) steps in (\d+) s done\)", err)
    assert adds and int(adds.group(1)) in (2, 3) and int(adds.group(2).replace(",", "")) == done["step"], err
    after = final_state(out)
    assert after["config"]["max_time"] == pytest.approx(done["elapsed"] + 2)
    assert after["step"] > done["step"] and after["elapsed"] <= done["elapsed"] + 2 + 0.5
    for argv, words in (
        (["train", "--resume", str(out), "--add-time", "2", "--max-time", "9"], "give one"),
        (["train", "--data", str(text_file), "--out", str(tmp_path / "new"), "--add-time", "5"], "with --resume"),
        (["train", "--resume", str(out), "--add-time", "-1"], "must be a number of seconds > 0"),
    ):
        rc, stdout, err = call_main(argv, capsys)
        assert rc == 2 and stdout == "" and err.count("\n") == 1 and words in err, err
