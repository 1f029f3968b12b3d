"""What a new user meets first: --help, --version, no abbreviations, one meaning per flag, the
announcement and the last lines of a run, a finished run resumed, eval's progress bar, sampling threads."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import shlex
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from chargpt import __version__
from chargpt.cli import build_parser, main
from chargpt.inference.generate import decode_threads
from chargpt.training.settings import resolve_preset
from conftest import run_cli
from helpers import assert_one_line_error, call_main

TINY = ["--block-size", "16", "--n-embd", "16", "--n-heads", "2", "--n-layers", "1", "--batch-size", "8"]
TINY += ["--eval-iters", "2", "--device", "cpu", "--seed", "3"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ---------------------------------------------------------------------------------------------
# --help shows every default and a description, in groups, with examples; --version


@pytest.mark.parametrize("command", ["train", "sample", "eval", "info"])
def test_every_flag_has_a_description_and_a_default(command):
    for action in _subparsers()[command]._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings or action.help == argparse.SUPPRESS:
            continue  # (a suppressed flag is an old spelling, kept working but not listed)
        flag = action.option_strings[0]
        assert action.help and len(action.help) > 12, f"{command} {flag} has no description"
        assert "default" in action.help or "required" in action.help, f"{command} {flag}: {action.help}"


def test_train_help_groups_examples_and_the_preset_of_this_machine(capsys):
    rc, out, _ = call_main(["train", "--help"], capsys)
    assert rc == 0
    for group in ("data:", "model:", "optimisation:", "evaluation and checkpoints:", "hardware:", "examples:"):
        assert f"\n{group}\n" in out, group
    assert out.count("\n  chargpt train ") >= 3  # the examples
    assert f"on this machine: --preset {resolve_preset(None, 'auto')} applies" in out
    # defaults that were once missing: the presets' values, --device, --beta2, --seed, --compile
    assert "128 with --preset cpu, 384 with --preset gpu, 384 with --preset seed" in " ".join(out.split())
    for flag, text in [("--device", "default: auto"), ("--beta2", "default: 0.99"), ("--seed", "default: 1337")]:
        assert text in " ".join(out.split(f"\n  {flag} ", 1)[1].split()[:25]), flag  # its entry, not the usage
    assert "(default: off)" in " ".join(out.split("\n  --compile, --no-compile", 1)[1].split()[:20])


def test_sample_help_shows_its_defaults(capsys):
    rc, out, _ = call_main(["sample", "--help"], capsys)
    text = " ".join(out.split())
    assert rc == 0
    assert "(default: 500)" in text and "(default: 1.0)" in text and "K likeliest characters (default: off)" in text
    assert "examples:" in out


def test_version(capsys):
    rc, out, _ = call_main(["--version"], capsys)
    assert rc == 0 and out.startswith(f"chargpt {__version__} (torch {torch.__version__}")


# ---------------------------------------------------------------------------------------------
# no abbreviations; unknown flags are one line, exit 2, with the close match


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["train", "--devic", "cpu"], "--device"),
        (["train", "--npr", "1"], "--nproc"),
        (["train", "--n-emb", "64"], "--n-embd"),
        (["sample", "--model", "x", "--temp", "0.5"], "--temperature"),
        (["eval", "--model", "x", "--data", "y", "--qui"], "--quiet"),
        (["info", "x", "--jso"], "--json"),
    ],
)
def test_abbreviated_flags_are_refused(argv, meant, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = call_main(argv, capsys)
    assert_one_line_error(
        rc, out, err, "unrecognized arguments: " + next(a for a in argv if a.startswith(meant[:4]) and a != meant)
    )
    assert f"did you mean {meant}?" in err and f"(see chargpt {argv[0]} --help)" in err
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_a_missing_required_flag_suggests_the_typo_or_the_bare_value(capsys, tmp_path, monkeypatch):
    """`--modle out/demo` and `sample out/demo` said only that --model is required."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    rc, out, err = call_main(["sample", "--modle", "demo"], capsys)
    assert_one_line_error(rc, out, err, "the following arguments are required: --model; did you mean --model?")
    for command in ("sample", "eval", "export"):
        rc, out, err = call_main([command, "demo"], capsys)
        assert_one_line_error(rc, out, err, "required: --model")
        assert "give it as --model demo" in err, err


def test_abbreviated_nproc_in_a_real_process(tmp_path):
    """Once dumped torchrun's usage text; now the one line, before torch is ever launched."""
    r = run_cli("train", "--npr", "1", cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "unrecognized arguments: --npr 1; did you mean --nproc?")


# ---------------------------------------------------------------------------------------------
# one meaning per flag name: train --arch; train --model is a deprecated alias


def test_train_model_with_a_directory_points_to_resume_and_sample(trained_model_dir, capsys):
    rc, out, err = call_main(["train", "--model", str(trained_model_dir), *TINY], capsys)
    assert_one_line_error(rc, out, err, "not a model directory")
    assert f"chargpt train --resume {trained_model_dir}" in err and f"chargpt sample --model {trained_model_dir}" in err
    rc, out, err = call_main(["train", "--model", "lstm", *TINY], capsys)
    assert_one_line_error(rc, out, err, "unknown architecture 'lstm'")


def test_train_arch_and_the_deprecated_model_alias(text_file, tmp_path, monkeypatch, capsys):
    from chargpt.model import BigramLM
    from chargpt.storage.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    rc, out, err = call_main(
        ["train", "--data", str(text_file), "--out", "a", "--arch", "bigram", "--n-updates", "2", "--quiet", *TINY],
        capsys,
    )
    assert rc == 0 and isinstance(load_model("a")[0], BigramLM), err
    rc, out, err = call_main(
        ["train", "--data", str(text_file), "--out", "b", "--model", "bigram", "--n-updates", "2", "--quiet", *TINY],
        capsys,
    )
    assert rc == 0 and isinstance(load_model("b")[0], BigramLM)
    assert "warning: train --model is deprecated; use --arch bigram" in err


def test_old_configs_that_say_model_still_load(tmp_path):
    """Runs saved before the rename (train_state.pt / config.json: "model") and TOML files with `model`."""
    from chargpt.config import load_toml
    from chargpt.training.settings import make_train_config, on_saved

    assert on_saved({"model": "bigram", "n_updates": 7}, "out").config.arch == "bigram"
    (tmp_path / "old.toml").write_text('model = "bigram"\n')
    assert load_toml(tmp_path / "old.toml") == {"arch": "bigram"}
    assert make_train_config("cpu", None, model="bigram", device="cpu").arch == "bigram"


# ---------------------------------------------------------------------------------------------
# items 1, 3 and 9: the run announces itself, ends with the exact next command; a finished run says so


def test_a_run_announces_itself_and_ends_with_a_command_that_works(text_file, tmp_path, monkeypatch, capsys):
    """The run in this process (its output goes to a pipe, as in a log); the command it ends with, as a user runs it."""
    monkeypatch.chdir(tmp_path)
    rc, stdout, stderr = call_main(["train", "--data", str(text_file), "--out", "m", "--n-updates", "6",
                                    "--eval-interval", "3", *TINY], capsys)  # fmt: skip
    assert rc == 0, stderr
    first, second = stderr.splitlines()[:2]
    assert first.startswith("training a GPT of ") and "parameters (1 layers x 2 heads, n_embd 16, context 16)" in first
    assert "preset cpu (no GPU found) with your --block-size, --n-embd, --n-heads, --n-layers" in first
    assert "10.8M" not in first  # no hint at the seed preset's model when the shape is the user's own
    assert re.search(r"on cpu in (fp32|bf16) \(.+\)", first), first  # what auto chose here, and why
    assert f"data {text_file}, 80,000 characters, vocabulary" in second and "split 72,000 train / 8,000 val" in second
    assert "budget 6 steps" in second and "writing m" in second
    settings = [line for line in stderr.splitlines() if line.startswith("settings: ")][0]  # where each came from
    assert "block_size 16, n_embd 16, n_heads 2, n_layers 1, batch_size 8, n_updates 6" in settings, settings
    assert "learning_rate 0.003, warmup_updates 50, checkpoint_interval 500 (preset cpu)" in settings, settings
    info = call_main(["info", "m"], capsys)[1]
    assert "settings from: --block-size (block_size); --n-embd (n_embd)" in info, info
    assert "preset cpu (dropout, learning_rate, warmup_updates, checkpoint_interval)" in info, info
    assert "\r" not in stderr  # output to a pipe or a log: no progress bar redrawn in place
    lines = stdout.splitlines()
    assert lines[0].startswith("done: 6 steps") and lines[1].startswith("best val loss ") and "in m" in lines[1]
    assert lines[2].startswith("next: ")
    next_command = shlex.split(lines[2].removeprefix("next: ").split("    (and")[0])
    assert next_command[-3:] == ["sample", "--model", "m"]
    ran = subprocess.run([*next_command, "--max-new-tokens", "5"], cwd=tmp_path, capture_output=True, text=True)
    assert ran.returncode == 0 and len(ran.stdout) == 1 + 5 + 1, ran.stderr  # prompt "\n", 5 characters, "\n"

    rc, again, err = call_main(["train", "--resume", "m"], capsys)  # a finished run: nothing to do, and how to do more
    assert rc == 0, err
    assert "m is already finished (6 steps" in again and "train --resume m --n-updates 12" in again
    assert "done:" not in again


def test_self_command(monkeypatch, tmp_path):
    from chargpt.cli import self_command

    venv_chargpt = Path(sys.executable).with_name("chargpt")
    monkeypatch.setattr(sys, "argv", [str(venv_chargpt), "train"])
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.chdir(tmp_path)
    assert self_command() == str(venv_chargpt.absolute())  # not on PATH: the path that works
    monkeypatch.chdir(venv_chargpt.parents[2])
    assert self_command() == str(venv_chargpt.absolute().relative_to(Path.cwd()))  # e.g. .venv/bin/chargpt
    monkeypatch.setenv("PATH", str(venv_chargpt.parent))
    assert self_command() == "chargpt"


# ---------------------------------------------------------------------------------------------
# chargpt eval shows progress on a terminal, not in a pipe or with --quiet


def _eval_with_stderr_on_a_terminal(*args: str) -> tuple[int, str, str]:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "chargpt", "eval", *args], stdout=subprocess.PIPE, stderr=follower, env=env
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done with it
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=120), out, seen.decode(errors="replace")


def test_eval_progress_bar_on_a_terminal_only(trained_model_dir, corpus_text, tmp_path, capsys):
    data = tmp_path / "part.txt"
    data.write_text(corpus_text[:20_001], encoding="utf-8")
    args = ("--model", str(trained_model_dir), "--data", str(data))
    rc, out, terminal = _eval_with_stderr_on_a_terminal(*args)
    assert rc == 0 and '"loss"' in out
    assert "evaluating:" in terminal and "/20.0k [" in terminal, terminal[-500:]  # the characters to score
    rc, out, terminal = _eval_with_stderr_on_a_terminal(*args, "--quiet")
    assert rc == 0 and '"loss"' in out and terminal == ""
    rc, out, err = call_main(["eval", *args], capsys)  # not a terminal: no bar
    assert rc == 0 and err == "" and '"loss"' in out


def test_eval_speaks_on_a_terminal_and_prints_json_elsewhere(trained_model_dir, corpus_text, tmp_path):
    data = tmp_path / "part.txt"
    data.write_text(corpus_text[:3_001], encoding="utf-8")
    args = ["eval", "--model", str(trained_model_dir), "--data", str(data), "--quiet"]
    for extra in ([], ["--json"]):
        leader, follower = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "chargpt", *args, *extra], stdout=follower,
                                stderr=subprocess.PIPE)  # fmt: skip
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        os.close(leader)
        assert proc.wait(timeout=120) == 0
        text = seen.decode().strip()
        if extra:
            assert json.loads(text)["chars"] == 3_000
        else:
            assert text.startswith(f"{data}: loss ") and "nats per character" in text and "3,000 predicted" in text


def test_progress_goes_to_a_log_as_plain_lines(caplog):
    """Not a terminal: the bar is off and a plain line says where the run is every PLAIN_EVERY seconds."""
    import logging
    import time

    from chargpt.config import TrainConfig
    from chargpt.training.report import PLAIN_EVERY, Progress

    bar = Progress(TrainConfig(n_updates=100), 0, 0.0, enabled=True, terminal=False)
    assert bar.bar.disable
    with caplog.at_level(logging.INFO, logger="chargpt"):
        now = time.perf_counter()
        bar.step_done(now, 1, 2.5, 0.1)  # too soon for a line
        bar.step_done(now + PLAIN_EVERY + 1, 2, 2.4, 0.2)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("progress: step 2 of 100, loss 2.4000, ") and line.endswith(" tokens/s")
    assert not Progress(TrainConfig(n_updates=100), 0, 0.0, enabled=True, terminal=True).plain


def test_eval_progress_callback_counts_every_character(trained_model_dir, corpus_text):
    from chargpt.inference.evaluate import evaluate
    from chargpt.storage.checkpoint import load_model

    model, tokenizer = load_model(trained_model_dir)
    counts: list[int] = []
    text = corpus_text[:5_000]
    assert evaluate(model, tokenizer, text, progress=counts.append) == evaluate(model, tokenizer, text)
    assert sum(counts) == len(text) - 1 and len(counts) > 1


# ---------------------------------------------------------------------------------------------
# sampling picks a fast thread count, and --threads sets it


def test_decode_threads_rule():
    assert decode_threads(1, cores=2, load=0.0) == 1  # one stream: always 1 thread
    assert decode_threads(1, cores=64, load=0.0) == 1
    assert decode_threads(8, cores=2, load=0.0) == 2  # a batch on an idle machine: the cores
    assert decode_threads(8, cores=2, load=4.0) == 1  # ... on a busy one: no more threads than idle cores
    assert decode_threads(4, cores=16, load=2.0) == 4  # never more threads than streams


def test_sample_threads_flag_and_default(trained_model_dir, capsys):
    before = torch.get_num_threads()
    try:
        base = ["sample", "--model", str(trained_model_dir), "--max-new-tokens", "40", "--seed", "5"]
        texts = {}
        torch.set_num_threads(2)
        for threads in ("2", "1"):
            assert main([*base, "--threads", threads]) == 0
            assert torch.get_num_threads() == 2  # put back: an in-process caller's training keeps its threads
            texts[threads] = capsys.readouterr().out
        assert main(base) == 0 and torch.get_num_threads() == 2  # the default (1 thread for one stream) too
        assert capsys.readouterr().out == texts["1"]  # the default is one thread: the same text, bit for bit
        # another thread count may round otherwise, and auto's formats are measured per thread count (README:
        # the same text "with the same number of torch threads"): the same length of text, not the same bits
        assert len(texts["2"]) == len(texts["1"]) > 40
        rc, out, err = call_main([*base, "--threads", "0"], capsys)
        assert_one_line_error(rc, out, err, "--threads must be >= 1")
    finally:
        torch.set_num_threads(before)


NANOGPT = {  # nanoGPT's train.py flag as a user types it -> chargpt's flag the one-line error must name
    "--max_iters 2000": "--n-updates",
    "--lr 1e-3": "--learning-rate",
    "--learning_rate 1e-3": "--learning-rate",
    "--n_layer 4": "--n-layers",
    "--n_head 4": "--n-heads",
    "--n_embd 128": "--n-embd",
    "--batch_size 32": "--batch-size",
    "--block_size 64": "--block-size",
    "--eval_interval 100": "--eval-interval",
    "--eval_iters 20": "--eval-iters",
    "--out_dir out/x": "--out",
    "--init_from resume": "--resume DIR",
}


@pytest.mark.parametrize("words", sorted(NANOGPT))
def test_nanogpts_flag_names_get_chargpts_in_one_line(words: str, capsys):
    rc, out, err = call_main(["train", *words.split()], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert f"is nanoGPT's name: chargpt's is {NANOGPT[words]}" in err
    assert "did you mean" not in err  # never a wrong guess (--max_iters once suggested --eval-iters)


def test_nanogpts_names_that_are_chargpts_too_just_work():
    args = build_parser().parse_args(["train", "--dropout", "0.1", "--compile", "--device", "cpu"])
    assert (args.dropout, args.compile, args.device) == (0.1, True, "cpu")
    assert "from nanoGPT: --max_iters is --n-updates" in _subparsers()["train"].format_help()


def test_train_help_shows_what_a_sized_run_uses_beside_each_default():
    """The default run with a budget is sized (Muon, WSD, shuffled passes): --help says so at each of those
    flags, not only in its footer."""
    from chargpt.training import sizing

    text = " ".join(_subparsers()["train"].format_help().split())
    for name, value in sizing.COMMON.items():
        assert f"; {value} in a run sized for --max-time)" in text, name
    assert "(default: adamw; muon in a run sized for --max-time)" in text
    assert "in a run sized for --max-time: picked for the budget" in text
