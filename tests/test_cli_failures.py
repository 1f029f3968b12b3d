"""The CLI at its edges: devices that are not there, absurd sizes, resume with the launch command, signals
during start-up and evaluation, a full or closed stdout, and the --nproc launcher's failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from chargpt.cli import main
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import layout, trainstate
from chargpt.training.loop import train
from chargpt.training.settings import resume_config
from conftest import run_cli
from helpers import FLAGS


def call(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture, expected: str) -> str:
    rc, out, err = call(argv, capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (rc, out, err)
    assert expected in err, err
    return err


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corpus_text: str) -> Path:
    (tmp_path / "ok.txt").write_text(corpus_text[:6000], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# 10: devices, for every command


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device"), ("mps", "no MPS"), ("cuda:7", "cuda")],
)
def test_devices_are_checked_by_every_command(device, message, work: Path, trained_model_dir: Path, capsys):
    if device in ("mps", "cuda:7") and (torch.backends.mps.is_available() or torch.cuda.device_count() > 7):
        pytest.skip("this machine has the device")
    for argv in (
        ["sample", "--model", str(trained_model_dir), "--max-new-tokens", "3"],
        ["eval", "--model", str(trained_model_dir), "--data", "ok.txt"],
        ["train", "--data", "ok.txt", "--out", "out", "--n-updates", "2"],
    ):
        one_line_error([*argv, "--device", device], capsys, message)
    assert not (work / "out").exists()


# ---------------------------------------------------------------------------------------------
# 8: absurd sizes are refused with an estimate before anything is allocated


@pytest.mark.parametrize(
    "flags",
    [["--batch-size", "100000000"], ["--n-embd", "100000000", "--n-heads", "4"], ["--n-layers", "1000000"]],
)
def test_absurd_sizes_are_refused_with_the_estimate(flags, work: Path, capsys):
    err = one_line_error(["train", "--data", "ok.txt", "--out", "out", "--device", "cpu", *flags], capsys, "needs")
    assert "GiB" in err and "this machine has" in err, err
    assert not (work / "out").exists()


def test_absurd_sample_batches_are_refused(trained_model_dir: Path, capsys):
    one_line_error(["sample", "--model", str(trained_model_dir), "--num-samples", "1000000000"], capsys, "needs")


def test_the_estimate_never_refuses_the_presets():
    from chargpt.config import PRESETS
    from chargpt.machine import memory
    from chargpt.training.settings import make_train_config

    for name in PRESETS:
        cfg = make_train_config(name)
        needed = memory.training_bytes(cfg.model_config(65), cfg.batch_size)
        assert needed < 2 << 30, (name, needed)  # under 2 GiB: any machine that can run them has that


# ---------------------------------------------------------------------------------------------
# 17, 18: the README's resume command (the launch command plus --resume DIR) and what may change


def test_resume_with_the_launch_command(work: Path, capsys):
    (work / "run.toml").write_text("block_size = 16\nn_embd = 32\nn_heads = 4\nn_layers = 1\neval_iters = 2\n")
    launch = ["train", "--data", "ok.txt", "--out", "run", "--config", "run.toml", "--preset", "cpu"]
    launch += ["--device", "cpu", "--quiet", "--batch-size", "8", "--eval-interval", "5"]
    rc, out, err = call([*launch, "--n-updates", "5"], capsys)
    assert rc == 0, err
    rc, out, err = call([*launch, "--n-updates", "8", "--resume", "run"], capsys)  # same command + --resume
    assert rc == 0 and "done: 8 steps" in out, err
    err = one_line_error([*launch, "--n-embd", "64", "--resume", "run"], capsys, "--n-embd sets n_embd = 64")
    assert "cannot change on resume" in err and "n_updates" in err, err
    (work / "other.toml").write_text("block_size = 32\n")
    err = one_line_error(["train", "--config", "other.toml", "--resume", "run"], capsys, "--config other.toml sets")
    assert "block_size" in err
    one_line_error(["train", "--preset", "seed", "--resume", "run"], capsys, "--preset seed sets")
    one_line_error(["train", "--data", "other.txt", "--resume", "run"], capsys, "data cannot change on resume")
    assert trainstate.load_train_state(work / "run").step == 8


def test_misleading_messages_are_gone(work: Path, trained_model_dir: Path, capsys):
    (work / "utf16.txt").write_text("hello there\n" * 50, encoding="utf-16")
    one_line_error(["train", "--data", "utf16.txt", "--out", "o"], capsys, "looks like UTF-16")
    one_line_error(["eval", "--model", str(trained_model_dir), "--data", "utf16.txt"], capsys, "looks like UTF-16")
    one_line_error(["sample", "--model", "ok.txt"], capsys, "ok.txt is a file, not a model directory")


# ---------------------------------------------------------------------------------------------
# 14, 15: Ctrl-C while starting up; a full or closed stdout


def _mapped(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.end_to_end
def test_ctrl_c_during_start_up_is_one_word_and_130(work: Path):
    """SIGINT while chargpt starts: as torch is being imported, at points through that import, and while
    the data loads (the lock file exists); one process at a time, so that each import runs at its own speed.
    Python's own start-up before chargpt runs is the interpreter's, not chargpt's. A Ctrl-C inside torch's
    import used to abort the process or end it by SIGINT (-6 or -2 instead of 130), about 1 time in 8."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "chargpt", "train", "--data", "ok.txt", *FLAGS, "--out"]
    moments = ["torch", "torch+0.3s", "torch+0.5s", "torch+0.6s", "torch+0.9s", "torch+1.3s", "lock"]
    for i, moment in enumerate(moments):  # old failures clustered at 0.5-0.6 s and 1.3 s here (7 in 72)
        proc = subprocess.Popen([*cmd, f"out{i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline, lock = time.monotonic() + 120, work / f"out{i}" / ".chargpt.lock"
        while not (_mapped(proc.pid, "libtorch") if moment != "lock" else lock.exists()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.001)
        if moment.startswith("torch+"):
            time.sleep(float(moment[len("torch+") : -1]))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, (moment, err)
        assert proc.returncode == 130 and "interrupted" in err, (moment, proc.returncode, err)


def test_a_full_stdout_is_one_line_and_a_closed_one_is_quiet(trained_model_dir: Path, text_file: Path):
    with open("/dev/full", "w") as full:
        for args in (["sample", "--max-new-tokens", "20"], ["eval", "--data", str(text_file)]):
            r = subprocess.run(
                [sys.executable, "-m", "chargpt", args[0], "--model", str(trained_model_dir), *args[1:]],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert "cannot write the output (No space left on device)" in r.stderr, r.stderr
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chargpt", "sample", "--model", str(trained_model_dir), "--max-new-tokens", "100000"],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write)
    os.read(read, 10)  # the reader takes a little, then goes away (`chargpt sample | head -c 10`)
    os.close(read)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == "", (proc.returncode, err)


# ---------------------------------------------------------------------------------------------
# 7: a signal during a (long) evaluation stops the run without waiting for it


def _saved_step(out: Path) -> int:
    try:
        return int(torch.load(out / layout.TRAIN_STATE, weights_only=True)["step"])
    except Exception:  # not written yet, or being replaced right now
        return -1


def test_sigterm_during_evaluation_stops_at_once_and_resume_evaluates_first(work: Path):
    """The step-0 evaluation of a run with an absurd eval_iters is cut short by SIGTERM; the resumed run
    evaluates step 0 first (with a sane eval_iters), then goes on."""
    out = work / "run"
    flags = [f for f in FLAGS if not f.startswith(("--eval-iters", "--eval-interval", "--checkpoint-interval"))]
    flags = [f for f in flags if f != "--quiet"]  # the announcement says when set-up is over
    args = ["--data", "ok.txt", "--out", str(out), *flags, "--eval-interval=3", "--checkpoint-interval=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chargpt", "train", *args, "--eval-iters=1000000", "--n-updates=6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    announced = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "; budget " in line:  # the announcement's last line: the (endless) step-0 evaluation follows
                announced.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert announced.wait(240), "".join(lines)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)  # without the check between batches: hours
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 143 and "interrupted by SIGTERM at step 0" in err, err
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # the cut-short evaluation recorded nothing
    result = train(resume_config(out, eval_iters=2), resume=True, progress=False)
    assert result.step == 6 and result.stopped_by == "n_updates"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if m["kind"] == "eval"] == [0, 3, 6]


# ---------------------------------------------------------------------------------------------
# 12: the --nproc launcher shows one line


@pytest.mark.end_to_end
def test_nproc_user_error_is_one_line_and_exit_2(work: Path):
    r = run_cli("train", "--nproc", "2", "--data", "missing.txt", "--out", "out", *FLAGS, timeout=240)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if "chargpt" in line]
    assert lines == ["chargpt: error: data path missing.txt does not exist; pass an existing text file or folder"], (
        r.stderr
    )
    assert not (work / "out").exists()


@pytest.mark.end_to_end
def test_nproc_ctrl_c_is_one_line_and_130(work: Path):
    out = work / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chargpt", "train", "--nproc", "2", "--data", "ok.txt", "--out", str(out), *FLAGS]
        + ["--n-updates=100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while _saved_step(out) < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGINT at step") and f"--resume {out}" in last, err
    assert err.count("interrupted") == 1, err


# ---------------------------------------------------------------------------------------------
# what a careless or hostile value does: one line and exit 2, or the right result, never a traceback


def test_empty_and_nul_paths_and_over_long_names_are_one_line(work: Path, capsys):
    one_line_error(["train", "--resume", ""], capsys, "--resume got an empty path")  # was: a fresh run
    one_line_error(["train", "--config", "", "--out", "o"], capsys, "--config got an empty path")  # was: ignored
    one_line_error(["sample", "--model", "a\0b"], capsys, "NUL byte")
    (work / "nul.toml").write_text('token_cache = "a\\u0000b"\n')  # was: silently ignored
    one_line_error(
        ["train", "--config", "nul.toml", "--out", "o"], capsys, "token_cache in nul.toml contains a NUL byte"
    )
    (work / "nul-data.toml").write_text('data = "x\\u0000y"\n')  # was: a ValueError traceback on resume
    assert main(["train", "--data", "ok.txt", "--out", "run", *FLAGS, "--n-updates=2"]) == 0
    capsys.readouterr()
    one_line_error(["train", "--resume", "run", "--config", "nul-data.toml"], capsys, "data in nul-data.toml contains")
    shutil.rmtree(work / "run")
    one_line_error(["train", "--data", "ok.txt", "--out", "x" * 300, *FLAGS], capsys, "File name too long")
    one_line_error(["sample", "--model", "y" * 300], capsys, "")
    assert not (work / "out").exists() and not (work / "o").exists()


def test_tiny_temperature_and_top_p_are_their_limits_not_a_crash(trained_model_dir: Path):
    """1e-45 overflowed the scaled logits (multinomial on NaN): the limit of a vanishing temperature is greedy,
    and of a vanishing top-p the likeliest character alone."""
    from chargpt.inference.generate import generate

    model, tokenizer = ckpt.load_model(trained_model_dir)
    greedy = generate(model, tokenizer, "\n", max_new_tokens=30, temperature=0, precision="fp32")
    for kw in (dict(temperature=1e-45), dict(top_p=1e-45), dict(temperature=1e-45, top_p=1e-45, top_k=3)):
        assert generate(model, tokenizer, "\n", max_new_tokens=30, seed=1, precision="fp32", **kw) == greedy, kw


def test_a_huge_max_new_tokens_is_refused_before_allocating(trained_model_dir: Path, capsys):
    argv = ["sample", "--model", str(trained_model_dir), "--max-new-tokens", str(10**12), "--no-stream"]
    one_line_error(argv, capsys, "ask for fewer new tokens")


def test_a_non_utf8_out_and_run_files_that_are_folders(work: Path, capsys):
    one_line_error(["train", "--data", "ok.txt", "--out", "o\udcff", *FLAGS], capsys, "is not UTF-8")
    assert not list(work.glob("o?"))
    out = work / "run"
    assert main(["train", "--data", "ok.txt", "--out", str(out), *FLAGS, "--n-updates=5"]) == 0
    (out / "loss.png").unlink()
    (out / "loss.png").mkdir()  # the picture cannot be drawn: the run goes on, and says so
    assert main(["train", "--resume", str(out), "--n-updates=10", "--quiet"]) == 0
    assert trainstate.load_train_state(out).step == 10
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()  # the history cannot be written: one line, no traceback
    capsys.readouterr()
    one_line_error(["train", "--resume", str(out), "--n-updates=15", "--quiet"], capsys, "metrics.jsonl is a folder")


def test_vocab_files_and_text_encodings_are_named_for_what_they_are(work: Path, capsys):
    (work / "empty.txt").write_text("")
    one_line_error(
        ["train", "--data", "ok.txt", "--vocab", "empty.txt", "--out", "o"], capsys, "vocab file empty.txt is empty"
    )
    (work / "folder").mkdir()
    one_line_error(["train", "--data", "ok.txt", "--vocab", "folder", "--out", "o"], capsys, "is a directory")
    os.mkfifo(work / "fifo")
    one_line_error(["train", "--data", "ok.txt", "--vocab", "fifo", "--out", "o"], capsys, "is a FIFO")
    (work / "utf32.txt").write_text("hello there\n" * 50, encoding="utf-32")
    one_line_error(["train", "--data", "utf32.txt", "--out", "o"], capsys, "looks like UTF-32")
    (work / "utf32le.txt").write_bytes(("hello there\n" * 50).encode("utf-32-le"))  # no byte-order mark
    one_line_error(["train", "--data", "utf32le.txt", "--out", "o"], capsys, "looks like UTF-32")
    assert not (work / "o").exists()


def test_a_diverged_run_names_what_made_it_diverge(work: Path, capsys):
    one_line_error(["train", "--data", "ok.txt", "--out", "o", *FLAGS, "--weight-decay", "1e300"], capsys,
                   "lower --weight-decay")  # fmt: skip
    one_line_error(["train", "--data", "ok.txt", "--out", "o", *FLAGS, "--learning-rate", "1e30"], capsys,
                   "lower --learning-rate")  # fmt: skip


def test_resuming_on_changed_data_is_refused(work: Path, capsys):
    out = work / "run"
    assert main(["train", "--data", "ok.txt", "--out", str(out), *FLAGS, "--n-updates=5"]) == 0
    text = (work / "ok.txt").read_text()
    (work / "ok.txt").write_text(text[: len(text) // 2])  # the corpus shrank
    capsys.readouterr()
    one_line_error(["train", "--resume", str(out), "--n-updates=10", "--quiet"], capsys, "the data changed since")


def test_a_closed_log_pipe_does_not_end_training(work: Path):
    """`chargpt train ... 2>&1 | head -c 10`: the reader goes away after 10 bytes; the run goes on to the end."""
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "chargpt", "train", "--data", "ok.txt", "--out", "run", *FLAGS[:-3],
                             "--n-updates=12", "--threads=1"], stdout=write, stderr=write)  # fmt: skip
    os.close(write)
    os.read(read, 10)
    os.close(read)
    assert proc.wait(timeout=240) == 0
    assert trainstate.load_train_state(work / "run").step == 12


def test_closed_stdout_and_stderr_are_quiet_not_tracebacks(trained_model_dir: Path, work: Path):
    """`>&-` and `2>&-`: Python starts with sys.stdout / sys.stderr None; chargpt runs, prints nothing, exits 0."""
    me = f'"{sys.executable}" -m chargpt'
    for line in (f'{me} info "{trained_model_dir}" >&-', f'{me} sample --model "{trained_model_dir}" '
                 f"--max-new-tokens 5 >&- 2>&-", f'{me} train --data ok.txt --out run {" ".join(FLAGS)} '
                 f"--n-updates=3 2>&-"):  # fmt: skip
        r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=240, cwd=work)
        assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout, (line, r.stderr)
    assert trainstate.load_train_state(work / "run").step == 3


def test_link_loops_and_a_file_size_limit_are_named(work: Path, capsys):
    (work / "loop-a").symlink_to("loop-b")
    (work / "loop-b").symlink_to("loop-a")
    one_line_error(["train", "--data", "loop-a", "--out", "o"], capsys, "a link that leads nowhere")
    one_line_error(["train", "--data", "ok.txt", "--vocab", "loop-a", "--out", "o"], capsys, "symbolic links")
    import resource

    def small_files() -> None:  # `ulimit -f 64`: no file over 64 KB
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = subprocess.run([sys.executable, "-m", "chargpt", "train", "--data", "ok.txt", "--out", "big", *FLAGS,
                        "--n-embd=64", "--n-updates=3"], capture_output=True, text=True, preexec_fn=small_files,
                       timeout=240)  # fmt: skip
    assert r.returncode == 2 and "file-size limit" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("megabytes", [300, 450])
def test_a_small_address_space_limit_is_one_line(trained_model_dir: Path, megabytes: int):
    """`ulimit -v`: torch's libraries cannot be mapped (300 MB here), or an allocation fails (450 MB)."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))

    r = subprocess.run([sys.executable, "-m", "chargpt", "info", str(trained_model_dir)], capture_output=True,
                       text=True, preexec_fn=limited, timeout=120)  # fmt: skip
    if r.returncode == 0:  # this machine's torch fits: nothing to check
        return
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
