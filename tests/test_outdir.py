"""The output folder: a user's files are never replaced, an overwrite never loses the old run (not even to
kill -9), one run at a time holds the folder, and a run that saves nothing leaves nothing behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from chargpt.cli import main
from chargpt.errors import ChargptError
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import layout, trainstate
from chargpt.storage.layout import BACKUP, LOCK, MARKER, MOVING, RUN_FILES
from chargpt.storage.runs import describe
from chargpt.training.loop import train
from chargpt.training.outdir import Busy, OutDir, lock_file
from chargpt.training.settings import resume_config
from helpers import FLAGS, small


def files(d: Path) -> dict[str, bytes]:
    """Every file under d (hidden ones too), by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def old_run(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished WSD run (n_embd 32, 10 steps) with all its run files: the run an overwrite must not lose."""
    out = tmp_path_factory.mktemp("old") / "run"
    train(small(out, text_file, n_updates=10, schedule="wsd"), progress=False)
    assert set(RUN_FILES) <= set(files(out))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# 1, 3: only files chargpt can prove it wrote are replaced


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "user_files",
    [
        {"metrics.jsonl": b'{"my": "own notes"}\n', "loss.png": b"\x89PNG my plot"},
        {"config.json": b'{"learning_rate": 3}\n', "metrics.jsonl": b"mine\n"},
        {"train_state.pt": b"my pickle"},
    ],
    ids=["metrics+plot", "own-config+metrics", "train_state"],
)
def test_files_chargpt_did_not_write_are_never_replaced(user_files, overwrite, text_file: Path, tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    for name, data in user_files.items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("keep me")
    before = files(out)
    with pytest.raises(ChargptError) as e:
        train(small(out, text_file, n_updates=2), overwrite=overwrite, progress=False)
    message = str(e.value)
    assert "chargpt did not write" in message and "never replaces" in message, message
    assert all(name in message for name in user_files), message
    assert files(out) == before


def test_a_chargpt_folder_is_recognised_by_its_marker_or_its_config(old_run: Path, text_file: Path, tmp_path: Path):
    """A folder from before the marker (config.json says chargpt-model) can still be overwritten."""
    legacy = copy_run(old_run, tmp_path / "legacy")
    (legacy / MARKER).unlink()
    train(small(legacy, text_file, n_updates=2, n_embd=16), overwrite=True, progress=False)
    assert ckpt.load_model(legacy)[0].config.n_embd == 16 and (legacy / MARKER).is_file()
    assert not (legacy / BACKUP).exists() and not (legacy / LOCK).exists()


# ---------------------------------------------------------------------------------------------
# 2: an overwrite that fails puts the old run back; one that is killed is rolled back by the next run


def test_an_overwrite_that_fails_before_saving_restores_the_old_run(old_run: Path, text_file: Path, tmp_path: Path):
    out = copy_run(old_run, tmp_path / "run")
    before = files(out)
    cfg = small(out, text_file, n_updates=10, n_embd=64, learning_rate=1e30)
    with pytest.raises(ChargptError, match="nothing was saved.*; the previous run in .* is back in place"):
        train(cfg, overwrite=True, progress=False)
    assert files(out) == before  # byte for byte, the marker included
    result = train(resume_config(out, n_updates=12), resume=True, progress=False)  # and still resumable
    assert result.step == 12 and ckpt.load_model(out)[0].config.n_embd == 32


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _run_files(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in RUN_FILES if (out / n).exists()}


def _read_view(out: Path) -> dict[str, bytes]:
    """The run files as a reader (sample, eval, info, serve) finds them, without changing the folder."""
    return {n: ckpt.run_file(out, n).read_bytes() for n in RUN_FILES if ckpt.run_file(out, n).exists()}


def _next_train_takes(out: Path) -> None:
    """What the next `chargpt train` on the folder does first: take the lock and finish a cut-short overwrite."""
    with OutDir(out, resume=True, overwrite=False):
        pass


@pytest.mark.end_to_end
def test_sigkill_at_any_point_of_an_overwrite_leaves_one_run(old_run: Path, text_file: Path, tmp_path: Path):
    """Kill -9 an overwriting run (n_embd 16 over 32) while it moves the old run aside, trains, saves its
    first files and drops the old run; the next run on the folder finds the old run whole or the new one
    alone, never a mix (a crash once left old weights beside the new run's train_state.pt)."""
    old = _run_files(old_run)
    args = ["--data", str(text_file), *FLAGS, "--n-embd=16", "--n-updates=40", "--overwrite"]
    seen = set()
    events = ["start", BACKUP, layout.WEIGHTS, "late"]
    for trial, event in enumerate(events):
        out = copy_run(old_run, tmp_path / f"run{trial}")
        old_inodes = {n: _inode(out / n) for n in RUN_FILES}
        proc = subprocess.Popen(
            [sys.executable, "-m", "chargpt", "train", "--out", str(out), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if event == "start" and (out / LOCK).exists():
                break
            if event == BACKUP and ((out / BACKUP).exists() or (out / MOVING).exists()):
                break
            if event == layout.WEIGHTS and _inode(out / event) not in (None, old_inodes[event]):
                break  # the new run's first save (the old run may still wait in the backup)
            if event == "late" and _inode(out / layout.TRAIN_STATE) not in (None, old_inodes[layout.TRAIN_STATE]):
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"{event}: the run ended before the kill point ({proc.stderr.read()})"
        proc.kill()
        proc.wait()
        seen_by_readers, tree = _read_view(out), files(out)
        if layout.WEIGHTS in seen_by_readers and layout.CONFIG in seen_by_readers:
            ckpt.load_model(out)  # a reader ...
        assert files(out) == tree  # ... changes nothing
        _next_train_takes(out)
        now = _run_files(out)
        assert now == seen_by_readers, f"{event}: readers saw another run than the one the folder keeps"
        if now == old:
            seen.add("old")
        else:
            seen.add("new")
            assert not set(now.items()) & set(old.items()), f"{event}: old and new files mixed"
            if layout.WEIGHTS in now:
                assert ckpt.load_model(out)[0].config.n_embd == 16
            if layout.TRAIN_STATE in now:
                assert trainstate.load_train_state(out).config["n_embd"] == 16
        assert not [p for p in out.iterdir() if p.name.startswith(".chargpt-previous")]
    assert seen == {"old", "new"}, seen


def test_readers_of_a_folder_left_mid_overwrite_read_the_old_run_and_change_nothing(old_run: Path, tmp_path: Path):
    """A kill between the move aside and the new run's first save: --resume, sample and info find the old run
    where it waits, and leave every file where it is; the next train puts it back."""
    before = _run_files(old_run)
    out = copy_run(old_run, tmp_path / "run")
    (out / BACKUP).mkdir()
    for name in RUN_FILES:
        os.replace(out / name, out / BACKUP / name)
    (out / layout.WEIGHTS).write_bytes(b"the new run's half-written weights")
    tree = files(out)
    assert resume_config(out).n_embd == 32 and ckpt.load_model(out)[0].config.n_embd == 32
    assert describe(out)["training"]["steps"] == 10
    assert files(out) == tree and _read_view(out) == before
    _next_train_takes(out)
    assert _run_files(out) == before and not (out / BACKUP).exists()


# ---------------------------------------------------------------------------------------------
# 4: one run per folder


HOLDER = textwrap.dedent(
    """
    import sys, time
    from chargpt.training.outdir import OutDir
    with OutDir(sys.argv[1], resume=False, overwrite=False):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(text_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"]):
            rc = main(["train", "--data", str(text_file), "--out", str(out), *FLAGS, "--n-updates=2", *extra])
            err = capsys.readouterr().err
            assert rc == 2 and err.count("\n") == 1, err
            assert f"in use by another chargpt run (process {holder.pid})" in err, err
    finally:
        holder.kill()  # kill -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    assert (out / LOCK).read_text().strip() == str(holder.pid)  # a stale lock file stays behind ...
    result = train(small(out, text_file, n_updates=2), progress=False)  # ... and is taken over
    assert result.step == 2 and not (out / LOCK).exists()


def test_a_lock_taken_on_a_file_just_removed_is_retried_on_the_new_one(tmp_path: Path, monkeypatch):
    """The race: a process opens the lock file; its holder finishes (removes the file, drops the lock) and a new
    run creates and locks a new one; the first flock then succeeds on the removed file. lock_file must see that,
    try the new file, and report it busy (so that nobody rolls back or unlocks under the new run)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("1\n")  # the finishing holder's file
    real_flock, new_run = fcntl.flock, []

    def flock_after_the_swap(fd: int, op: int) -> None:
        if not new_run:  # between the open and the flock: the holder leaves, a new run comes
            new_run.append(None)
            (out / LOCK).unlink()
            new_run[0] = lock_file(out / LOCK)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_swap)
    with pytest.raises(Busy):
        lock_file(out / LOCK)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert (out / LOCK).stat().st_ino == os.fstat(new_run[0]).st_ino  # the new run's lock is still in place
    os.close(new_run[0])


def test_the_lock_is_held_for_the_whole_run(text_file: Path, tmp_path: Path):
    """Inside a run, a second claim on the folder fails: the lock is taken before and released after."""
    out = tmp_path / "run"
    with OutDir(out, resume=False, overwrite=False):
        with pytest.raises(ChargptError, match=f"in use by another chargpt run \\(process {os.getpid()}\\)"):
            train(small(out, text_file, n_updates=2), progress=False)
        assert not (out / layout.WEIGHTS).exists()
    train(small(out, text_file, n_updates=2), overwrite=True, progress=False)
    with pytest.raises(ChargptError, match="already holds a model"):
        train(small(out, text_file, n_updates=2), progress=False)


# ---------------------------------------------------------------------------------------------
# 16, 19: a run that saves nothing leaves nothing, and says what to do


def test_a_fresh_run_that_fails_leaves_no_folder(text_file: Path, tmp_path: Path):
    out = tmp_path / "a" / "run"
    with pytest.raises(ChargptError, match="nothing was saved"):
        train(small(out, text_file, learning_rate=1e30, n_updates=10), progress=False)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ChargptError, match="nothing was saved"):
        train(small(existing, text_file, learning_rate=1e30, n_updates=10), progress=False)
    assert files(existing) == {"notes.txt": b"mine"}


def test_an_empty_out_is_refused(text_file: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for out, said in (("", "--out got an empty path"), (" ", "--out must name a folder")):
        rc = main(["train", "--data", str(text_file), "--out", out, *FLAGS])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == []


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    from chargpt.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_disk_full_before_anything_was_saved_does_not_advise_resuming(text_file: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = ["4096", "train", "--data", str(text_file), "--out", str(out), *FLAGS, "--n-updates=10"]
    r = subprocess.run([sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "file-size limit" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "then start the run again" in r.stderr and "resume" not in r.stderr, r.stderr
    assert not out.exists()


def test_a_train_state_with_a_nan_clock_is_refused(old_run: Path, tmp_path: Path, capsys):
    out = copy_run(old_run, tmp_path / "run")
    for key, value in (("elapsed", float("nan")), ("step", 2**64), ("best_val_loss", float("nan"))):
        state = torch.load(old_run / layout.TRAIN_STATE, weights_only=True)
        state[key] = value
        torch.save(state, out / layout.TRAIN_STATE)
        before = files(out)
        rc, err = main(["train", "--resume", str(out)]), capsys.readouterr().err
        assert rc == 2 and "train_state.pt" in err and err.count("\n") == 1 and key.split("_")[0] in err, err
        assert files(out) == before


# ---------------------------------------------------------------------------------------------
# links: reading a folder never writes, and nothing outside it is touched through a link


@pytest.mark.parametrize("name", [BACKUP, MOVING])
def test_a_linked_roll_back_folder_never_moves_anyone_s_files(name: str, old_run: Path, text_file: Path, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    for f in ("model.safetensors", "config.json", "notes.txt"):
        (victim / f).write_text(f"the user's {f}")
    out = copy_run(old_run, tmp_path / "run")
    (out / name).symlink_to(victim)
    mine, tree = files(victim), files(out)
    for command in (["info", str(out)], ["sample", "--model", str(out), "--max-new-tokens", "3"],
                    ["train", "--resume", str(out), "--n-updates", "12"],
                    ["train", "--out", str(out), "--data", str(text_file), *FLAGS, "--overwrite"]):  # fmt: skip
        rc = main(command)
        assert rc == 2, command
    assert files(victim) == mine and files(out) == tree and (out / name).is_symlink()


def test_a_linked_lock_file_is_never_written_through(old_run: Path, text_file: Path, tmp_path: Path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = copy_run(old_run, tmp_path / "run")
    (out / LOCK).symlink_to(target)
    assert main(["train", "--resume", str(out), "--n-updates", "12"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and err.count("\n") == 1, err
    assert target.read_text() == "keep me"
    # a dangling one: readers create nothing there either
    dangling = copy_run(old_run, tmp_path / "run2")
    (dangling / LOCK).symlink_to(tmp_path / "created-outside")
    assert main(["sample", "--model", str(dangling), "--max-new-tokens", "3"]) == 0
    assert main(["info", str(dangling)]) == 0
    assert not (tmp_path / "created-outside").exists()


def test_linked_model_files_are_refused_by_readers(old_run: Path, tmp_path: Path, capsys):
    out = copy_run(old_run, tmp_path / "run")
    outside = tmp_path / "outside.json"
    os.replace(out / layout.CONFIG, outside)
    (out / layout.CONFIG).symlink_to(outside)
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and err.count("\n") == 1, err


def test_a_run_killed_before_its_first_save_leaves_a_folder_every_command_explains(text_file: Path, tmp_path, capsys):
    """kill -9 inside the first eval_interval steps: metrics and plot, no model. info and --resume say what to
    do, and a plain train --out starts the run again there (no --overwrite needed: nothing is lost)."""
    out = tmp_path / "run"
    args = ["--out", str(out), "--data", str(text_file), *FLAGS, "--n-updates=100000", "--eval-interval=100000"]
    args += ["--checkpoint-interval=0"]
    proc = subprocess.Popen([sys.executable, "-m", "chargpt", "train", *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    assert (out / "metrics.jsonl").exists() and not (out / layout.WEIGHTS).exists()
    assert main(["info", str(out)]) == 2
    assert "stopped before it saved anything" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first save" in err and f"chargpt train --out {out}" in err, err
    flags = [a for a in args if not a.startswith(("--n-updates", "--eval-interval"))]
    assert main(["train", *flags, "--n-updates=4", "--eval-interval=2"]) == 0
    assert ckpt.load_model(out)[0] is not None and not (out / LOCK).exists()
