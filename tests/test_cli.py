"""The `chargpt` command end to end (train -> sample -> eval) and every bad input of the issue.

Commands run through `chargpt.cli.main` in this process (the same code path as the console script, without
paying python + torch start-up for each); what only a process shows runs as one: `--help` without torch, a
model-reading command that never imports torch._dynamo, and bad inputs that leave one line on stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chargpt.cli import main
from chargpt.storage.checkpoint import load_model
from conftest import run_cli
from helpers import assert_one_line_error, call_main, reference_loss

# Text the training never saw: modern prose in the characters of the training slice.
UNSEEN = (
    "The committee will meet on the first Monday of every month, and the minutes of each meeting\n"
    "shall be kept by the secretary; if the secretary be absent, the chair may appoint another.\n"
    "What good is a rule that nobody reads? Ask the printer, who set it in type twice!\n"
)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# end to end: train -> sample -> eval, with a TOML config that flags override


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("cli")
    (work / "run.toml").write_text(
        f'data = "{text_file.as_posix()}"\nblock_size = 16\nn_embd = 24\nn_heads = 2\nn_layers = 1\n'
        "batch_size = 8\nn_updates = 1000\neval_interval = 10\neval_iters = 2\nlearning_rate = 0.003\n"
        'device = "cpu"\nseed = 3\n',
        encoding="utf-8",
    )
    # flags override the TOML: n_layers, n_updates; everything else comes from the file
    return work, main_in(work, "train", "--config", "run.toml", "--n-layers", "2", "--n-updates", "20", "--out",
                         "model", "--quiet")  # fmt: skip


def main_in(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """chargpt.cli.main(argv) run in `cwd`, its output captured as run_cli's is (a module's fixture has no
    capsys)."""
    out, err, here = io.StringIO(), io.StringIO(), Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(argv), rc, out.getvalue(), err.getvalue())


def test_train_cli(cli_run):
    work, r = cli_run
    assert r.returncode == 0, r.stderr
    assert "done: 20 steps" in r.stdout and "chargpt sample --model model" in r.stdout
    assert "Traceback" not in r.stderr
    model_dir = work / "model"
    assert {"model.safetensors", "config.json", "metrics.jsonl", "loss.png", "train_state.pt"} <= {
        p.name for p in model_dir.iterdir()
    }
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if m["kind"] == "eval"] == [0, 10, 20]
    assert [m["step"] for m in rows if m["kind"] == "train"] == [10, 20]


def test_toml_keys_applied_and_flags_override(cli_run):
    work, _ = cli_run
    config = json.loads((work / "model" / "config.json").read_text(encoding="utf-8"))
    assert config["model"]["block_size"] == 16 and config["model"]["n_embd"] == 24  # from the TOML
    assert config["model"]["n_heads"] == 2
    assert config["model"]["n_layers"] == 2  # the flag beat the TOML's 1
    train_config = config["info"]["train_config"]
    assert train_config["n_updates"] == 20 and train_config["batch_size"] == 8 and train_config["seed"] == 3


def test_sample_cli(cli_run):
    work, _ = cli_run
    r = main_in(work, "sample", "--model", "model", "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:")
    assert len(r.stdout) == len("ROMEO:") + 60 + 1 and r.stdout.endswith("\n")
    _, tok = load_model(work / "model")
    assert set(r.stdout) <= set(tok.chars)


def test_commands_that_read_a_model_leave_torch_dynamo_unimported(cli_run, text_file):
    """sample, eval and info on a model build it on the meta device first (to check the file's shapes); a meta
    tensor's normal_ imported torch._dynamo, 1.5-1.9 s of each such command's ~3.7 s here. One process, all three."""
    work, _ = cli_run
    code = (
        "import sys; from chargpt.cli import main\n"
        "for args in (['sample', '--model', 'model', '--max-new-tokens', '5'], ['eval', '--model', 'model', '--data', "
        f"{str(text_file)!r}], ['info', 'model']):\n"
        "    assert main(args) == 0, args\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]", r.stdout[-300:]


def test_eval_cli_on_unseen_text(cli_run, tmp_path):
    work, _ = cli_run
    data = tmp_path / "unseen.txt"
    data.write_text(UNSEEN, encoding="utf-8")
    model, tok = load_model(work / "model")
    assert set(UNSEEN) <= set(tok.chars)
    assert UNSEEN[:40] not in (work / "run.toml").read_text() and len(UNSEEN) % 16 != 1  # a partial last window
    r = main_in(work, "eval", "--model", str(work / "model"), "--data", str(data), "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()  # not a terminal: one JSON object
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"loss", "bits_per_char", "chars", "precision", "quantize"} and result["precision"] == "fp32"
    assert result["chars"] == len(UNSEEN) - 1
    expected, _ = reference_loss(model, tok, UNSEEN)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["bits_per_char"] == pytest.approx(expected / math.log(2), rel=1e-5)
    assert result["loss"] < math.log(tok.vocab_size)  # trained for 20 steps: better than uniform


def test_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout and "eval" in r.stdout


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, no traceback, nothing written or overwritten


@pytest.fixture
def bad_inputs(tmp_path: Path, corpus_text: str) -> Path:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("Cor\u00e9 de la pi\u00e8ce".encode("latin-1"))
    (tmp_path / "short.txt").write_text(corpus_text[:40], encoding="utf-8")  # train 36, val 4 characters
    (tmp_path / "ok.txt").write_text(corpus_text[:4000], encoding="utf-8")
    (tmp_path / "unknown.toml").write_text("n_embd = 48\nnum_layers = 2\n", encoding="utf-8")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    return tmp_path


TRAIN_BAD = [
    (["--data", "empty.txt"], "empty.txt is empty"),
    (["--data", "latin1.txt"], "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
    (["--data", "missing.txt"], "does not exist"),
    (["--data", "empty_dir"], "holds no .txt files"),
    (["--data", "short.txt", "--block-size", "8"], "validation split has 4 characters but block_size + 1 = 9"),
    (["--data", "short.txt", "--block-size", "8", "--val-fraction", "0.9"], "train split has 4 characters"),
    (["--data", "ok.txt", "--n-embd", "50", "--n-heads", "4"], "n_embd (50) must be divisible by n_heads (4)"),
    (["--data", "ok.txt", "--n-embd", "0"], "n_embd must be a positive integer, got 0"),
    (["--data", "ok.txt", "--n-heads", "-2"], "n_heads must be a positive integer, got -2"),
    (["--data", "ok.txt", "--n-layers", "0"], "n_layers must be a positive integer, got 0"),
    (["--data", "ok.txt", "--block-size", "-8"], "block_size must be a positive integer, got -8"),
    (["--data", "ok.txt", "--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--data", "ok.txt", "--n-updates", "-1"], "n_updates must be a positive integer, got -1"),
    (["--data", "ok.txt", "--eval-interval", "0"], "eval_interval must be a positive integer, got 0"),
    (["--data", "ok.txt", "--eval-iters", "0"], "eval_iters must be a positive integer, got 0"),
    (["--data", "ok.txt", "--learning-rate", "0"], "learning_rate must be a positive number, got 0.0"),
    (["--data", "ok.txt", "--learning-rate", "-0.001"], "learning_rate must be a positive number"),
    (["--data", "ok.txt", "--learning-rate", "nan"], "learning_rate must be a positive number"),
    (["--data", "ok.txt", "--dropout", "-0.1"], "dropout must be in [0, 1)"),
    (["--data", "ok.txt", "--val-fraction", "0"], "val_fraction must be in (0, 1)"),
    (["--data", "ok.txt", "--max-time", "-5"], "max_time must be a number >= 0"),
    (
        ["--data", "ok.txt", "--window-order", "sideways"],
        "invalid choice: 'sideways' (choose from 'random', 'shuffled')",
    ),
    (["--data", "ok.txt", "--precision", "bogus"], "invalid choice: 'bogus' (choose from 'auto', 'fp32', 'bf16')"),
    (["--data", "ok.txt", "--config", "unknown.toml"], "unknown key(s) in unknown.toml: num_layers"),
    (["--data", "ok.txt", "--config", "missing.toml"], "config file missing.toml does not exist"),
    (["--data", "ok.txt", "--n-embd", "big"], "argument --n-embd: invalid int value: 'big'"),
]


@pytest.mark.parametrize(("args", "message"), TRAIN_BAD, ids=[" ".join(a) for a, _ in TRAIN_BAD])
def test_train_bad_input(bad_inputs, monkeypatch, capsys, args, message):
    monkeypatch.chdir(bad_inputs)
    before = snapshot(bad_inputs)
    small = ["--n-embd", "16", "--n-heads", "2", "--n-layers", "1", "--block-size", "16", "--device", "cpu"]
    rc, out, err = call_main(["train", "--out", "out/model", "--quiet", *small, *args], capsys)
    assert_one_line_error(rc, out, err, message)
    assert snapshot(bad_inputs) == before  # no file written


def test_bad_train_input_never_touches_an_existing_model(trained_model_dir, tmp_path, monkeypatch, capsys):
    """Even with --overwrite, a run that fails on its input leaves the model directory as it was."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained_model_dir, model)
    before = snapshot(model)
    (tmp_path / "empty.txt").write_bytes(b"")
    for extra in ([], ["--overwrite"]):
        for args, message in [
            (["--data", "empty.txt"], "is empty"),
            (["--n-embd", "50", "--n-heads", "4"], "divisible"),
            (["--batch-size", "0"], "batch_size must be a positive integer"),
        ]:
            monkeypatch.chdir(tmp_path)
            rc, out, err = call_main(["train", "--out", "model", "--device", "cpu", "--quiet", *extra, *args], capsys)
            expected = message if extra or args[0] != "--data" else "already holds a model"
            assert_one_line_error(rc, out, err, expected)
            assert snapshot(model) == before


SAMPLE_EVAL_BAD = [
    (["sample", "--model", "missing_dir"], "model directory missing_dir does not exist"),
    (["sample", "--model", "empty_dir"], "empty_dir holds no model"),
    (["sample", "--model", "not_a_model"], "not_a_model holds no model"),
    (["sample", "--model", "MODEL", "--prompt", "Romeo €"], "character(s) not in the model's vocabulary: '€'"),
    (["sample", "--model", "MODEL", "--prompt", "日本"], "not in the model's vocabulary: '日', '本'"),
    (["sample", "--model", "MODEL", "--temperature", "-1"], "temperature must be"),
    (["eval", "--model", "missing_dir", "--data", "ok.txt"], "model directory missing_dir does not exist"),
    (["eval", "--model", "empty_dir", "--data", "ok.txt"], "empty_dir holds no model"),
    (["eval", "--model", "MODEL", "--data", "empty.txt"], "empty.txt is empty"),
    (["eval", "--model", "MODEL", "--data", "latin1.txt"], "latin1.txt is not UTF-8 text"),
    (["eval", "--model", "MODEL", "--data", "missing.txt"], "missing.txt does not exist"),
    (["eval", "--model", "MODEL", "--data", "empty_dir"], "data file empty_dir is not a file; pass a UTF-8 text file"),
    (["eval", "--model", "MODEL", "--data", "unknown.toml"], "not in the model's vocabulary: '2', '4', '8', '=', '_'"),
]


@pytest.mark.parametrize(("args", "message"), SAMPLE_EVAL_BAD, ids=[" ".join(a) for a, _ in SAMPLE_EVAL_BAD])
def test_sample_and_eval_bad_input(bad_inputs, trained_model_dir, monkeypatch, capsys, args, message):
    monkeypatch.chdir(bad_inputs)
    before, model_before = snapshot(bad_inputs), snapshot(trained_model_dir)
    argv = [str(trained_model_dir) if a == "MODEL" else a for a in args]
    rc, out, err = call_main([*argv, "--device", "cpu"], capsys)
    assert_one_line_error(rc, out, err, message)
    assert snapshot(bad_inputs) == before and snapshot(trained_model_dir) == model_before


def test_bad_input_in_a_real_process(bad_inputs, trained_model_dir):
    """The console entry point as a user meets it: exit code 2, one line, no traceback, no files."""
    before = snapshot(bad_inputs)
    cases = [
        (["train", "--data", "empty.txt", "--out", "out"], "empty.txt is empty"),
        (["train", "--data", "ok.txt", "--config", "unknown.toml", "--out", "out"], "unknown key(s)"),
        (["sample", "--model", str(trained_model_dir), "--prompt", "Romeo €"], "not in the model's vocabulary"),
    ]
    for args, message in cases:
        r = run_cli(*args, cwd=bad_inputs)
        assert_one_line_error(r.returncode, r.stdout, r.stderr, message)
    assert snapshot(bad_inputs) == before


def test_chargpt_alone_prints_help_and_a_typo_gets_a_suggestion(capsys):
    rc, out, err = call_main([], capsys)
    assert rc == 0 and "usage: chargpt" in out and "start here:" in out and err == ""
    rc, out, err = call_main(["trian"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "did you mean train?" in err, err
    rc, out, err = call_main(["train", "--help"], capsys)
    assert rc == 0 and "--model" not in out and "deprecated" not in out  # the old spelling still works, unlisted
    assert "--token-cache" in out and "(default: None)" not in out
