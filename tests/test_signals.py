"""Real signals: Ctrl-C and SIGTERM stop `chargpt train` resumably, SIGKILL mid-save never leaves a broken directory."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from chargpt.config import GPTConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import build_model
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import layout
from chargpt.training.loop import train
from chargpt.training.settings import make_train_config
from helpers import FLAGS, SMALL, assert_same_tensors, call_main, final_state, metrics, small


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "chargpt", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _wait_for_new_state(proc: subprocess.Popen, state: Path, old: int | None) -> None:
    """Until the run has saved a train state (a new file: every save is a rename) while still running."""
    deadline = time.monotonic() + 240  # a safety net against a hung child, not a timing assertion
    while _inode(state) in (None, old):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the training run never saved a state"
        time.sleep(0.01)


@pytest.mark.end_to_end
def test_sigint_sigkill_sigterm_then_resume_equals_the_uninterrupted_run(text_file: Path, tmp_path: Path, capsys):
    n = 60
    out = tmp_path / "run"
    state = out / layout.TRAIN_STATE
    interrupts = []
    # 1. Ctrl-C a fresh run; 2. SIGKILL a resumed run (a crash: only the periodic state survives); 3. SIGTERM
    for sig in (signal.SIGINT, signal.SIGKILL, signal.SIGTERM):
        args = ["--resume", str(out)] if interrupts else ["--data", str(text_file), "--out", str(out), *FLAGS]
        old = _inode(state)
        proc = _start(*args, f"--n-updates={n}")
        _wait_for_new_state(proc, state, old)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
        interrupts.append((sig, proc.returncode, final_state(out)["step"]))
        assert "Traceback" not in err, err
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            continue
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
        name = signal.Signals(sig).name
        assert f"interrupted by {name}" in err and f"chargpt train --resume {out}" in err, err
    assert 0 < interrupts[0][2] < interrupts[-1][2] < n, interrupts
    rc, stdout, err = call_main(["train", "--resume", str(out)], capsys)  # the last resume: no signal, in-process
    assert rc == 0 and f"done: {n} steps" in stdout, err

    ref = tmp_path / "reference"
    cli_like = {**SMALL, "device": "cpu", "seed": 7, "n_updates": n, "threads": 1, "precision": "fp32"}
    train(make_train_config(None, None, data=str(text_file), out=str(ref), **cli_like), progress=False)
    a, b = final_state(ref), final_state(out)
    for part in ("model", "optimizer"):
        assert_same_tensors(a[part], b[part], part)
    for part in ("torch", "batches"):  # the generators training draws from (numpy/python are never seeded)
        assert_same_tensors(a["rng"][part], b["rng"][part], part)
    assert metrics(out) == metrics(ref)


ZYGOTE = textwrap.dedent(
    """
    # Builds three different models once, then for each request forks a child that saves them in turn, forever.
    import os, sys, torch
    from chargpt.storage import checkpoint as ckpt
    from chargpt.config import GPTConfig
    from chargpt.model import build_model
    from chargpt.data.tokenizer import CharTokenizer
    chars = [chr(c) for c in range(32, 127)]
    versions = []
    for seed, n_embd, n_vocab in ((0, 64, 95), (1, 64, 95), (2, 96, 60)):
        torch.manual_seed(seed)
        versions.append((build_model(GPTConfig(n_vocab, 64, n_embd, 4, 3, 0.0)), CharTokenizer(chars[:n_vocab])))
    directory = sys.argv[1]
    ckpt.save_model(directory, *versions[0], info={"version": 0})
    print("ready", flush=True)
    for trial in sys.stdin:
        pid = os.fork()
        if pid == 0:
            i = int(trial)
            while True:
                i += 1
                ckpt.save_model(directory, *versions[i % 3], info={"version": i % 3})
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


@pytest.mark.end_to_end
def test_sigkill_during_saves_always_leaves_a_loadable_directory(tmp_path: Path):
    chars = [chr(c) for c in range(32, 127)]
    versions = []
    for seed, n_embd, n_vocab in ((0, 64, 95), (1, 64, 95), (2, 96, 60)):
        torch.manual_seed(seed)
        model = build_model(GPTConfig(n_vocab, 64, n_embd, 4, 3, 0.0))
        versions.append((model.state_dict(), CharTokenizer(chars[:n_vocab])))

    d = tmp_path / "model"
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert zygote.stdout.readline().strip() == "ready"
        rng = random.Random(1234)
        seen, mid_write = set(), 0
        for trial in range(25):
            zygote.stdin.write(f"{trial}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(pid, signal.SIGKILL)
            assert zygote.stdout.readline().strip() == "reaped"  # dead: nothing can touch the directory now
            temps = [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
            mid_write += bool(temps)
            assert len(temps) <= 2 and len({t.split(".")[1] for t in temps}) == len(temps), temps  # one per file
            model, tok = ckpt.load_model(d)
            matches = [i for i, (sd, vt) in enumerate(versions) if tok == vt and model.state_dict().keys() == sd.keys()]
            got = model.state_dict()
            matches = [i for i in matches if all(torch.equal(got[k], versions[i][0][k]) for k in got)]
            assert len(matches) == 1, f"trial {trial}: the directory holds no complete version"
            seen.add(matches[0])
    finally:
        zygote.kill()
        zygote.wait()
    assert len(seen) >= 2  # the kills did land at different points of the cycle
    print(f"kill trials: 25, killed mid-write (a temp file present): {mid_write}, versions seen: {sorted(seen)}")


def test_a_process_a_test_leaves_running_is_killed_when_the_test_ends(tmp_path):
    """conftest's guard, checked in a pytest run of its own: a test starts a child that would sleep for 10
    minutes and ends (here, fails) without stopping it; once that run is over the child is gone."""
    (tmp_path / "test_leaky.py").write_text(
        textwrap.dedent(
            f"""
            import subprocess, sys
            def test_leaks():
                child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
                open({str(tmp_path / "pid")!r}, "w").write(str(child.pid))
                assert False, "a failing test leaves its child running"
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "1 failed" in r.stdout, r.stdout[-2000:]
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while _state(pid) not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(pid) in ("gone", "Z"), "the leaked child is still running"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing is the point
def test_a_start_up_ctrl_c_that_python_swallowed_still_stops_training(text_file: Path, tmp_path: Path):
    """Python drops a KeyboardInterrupt raised while a finalizer runs ("Exception ignored in ..."): a Ctrl-C that
    lands there during start-up used to be lost, and the run trained on. The CLI's start-up handler remembers it,
    and training stops at its first step, resumable, as for any Ctrl-C."""
    from chargpt.errors import RememberedInterrupt

    class SwallowsACtrlC:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, inside the finalizer
            sum(range(10_000))  # Python code: the handler runs now, and its KeyboardInterrupt is ignored

    handler = RememberedInterrupt()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        thing = SwallowsACtrlC()
        del thing  # no KeyboardInterrupt reaches this frame
        assert handler.caught
        out = tmp_path / "run"
        result = train(small(out, text_file, n_updates=50), progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.stopped_by == "SIGINT" and result.step <= 1
    assert final_state(out)["step"] == result.step  # saved: `--resume` goes on from here
