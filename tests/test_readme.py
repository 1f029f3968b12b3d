"""The README and the reference pages it leads to (docs/cli.md, docs/serving.md) stay true: every code block in
them runs, in order (the README first, as a reader goes on), in a fresh folder, as a new user pastes it.

- ```python blocks run as scripts;
- ```toml blocks whose first line is `# NAME.toml` are written to NAME.toml;
- ```sh blocks run line by line: `chargpt ...` through chargpt.cli.main in this process (the words split
  by bash itself, so quoting such as $'\\n\\n' means what it means in a shell), with small budgets appended
  to `chargpt train` (TRAIN_BUDGET); `make demo` runs the Makefile's demo recipe the same way; any other
  command runs in bash. Each must exit 0.
- ```text blocks are output or synopses: their `chargpt` lines must parse.

A few commands cannot run in a test; SKIP lists them, each with its reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chargpt.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/cli.md", "docs/serving.md")  # read in this order, as a user reads on
README = "\n".join((ROOT / page).read_text(encoding="utf-8") for page in PAGES)

# Commands that cannot run here, matched at the start of a line, with why.
SKIP = {
    "make test": "runs this very suite",
    "make install": "the suite already runs in the installed venv",
    "pip install 'chargpt[export]'": "the suite's venv has the dev extras, export and onnxruntime among them",
    "make lint": "make lint runs separately (CI)",
    "make bench": "benchmarks take many minutes",
    "source ": "activating a venv changes only the pasting shell's PATH",
    "torchrun ": "multi-process / multi-machine launch (tests/test_distributed.py covers torchrun on CPU)",
    "chargpt train --nproc": "launches 8 processes (tests/test_distributed.py covers --nproc 2)",
    "chargpt serve": "a long-running server (tests/test_serve.py covers it)",
    "curl ": "talks to a running `chargpt serve` (tests/test_serve.py covers the same requests)",
    "lm_eval ": "evaluates a running `chargpt serve` (tests/test_lm_eval.py runs lm-eval the same way)",
}
# Python blocks that talk to a running server: tests/test_serve.py runs them against one.
SERVER_CLIENT = "from openai import OpenAI"
# Appended to every `chargpt train` (later flags win): seconds, not minutes, on 2 busy cores.
TRAIN_BUDGET = ["--max-time", "1", "--batch-size", "4", "--block-size", "32", "--eval-iters", "1", "--quiet"]
TRAIN_BUDGET += ["--device", "cpu"]
RESUME_BUDGET = ["--max-time", "3", "--quiet"]  # a resumed run: a little more than the first one
SAMPLE_BUDGET = ["--max-new-tokens", "40"]
# The Python API section's one-call training, as the CLI's budgets above: seconds instead of its minute.
PYTHON_BUDGET = ("max_time=60", "max_time=8")


def blocks(text: str = README) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.M | re.S)]


def shell_lines(body: str) -> list[str]:
    """Logical lines (backslash continuations joined), without blank and comment-only lines."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def demo_recipe() -> list[str]:
    """The Makefile's `demo` commands on a fresh clone (no out/demo yet), with $(VENV)/bin/chargpt as plain
    chargpt: echo lines dropped, and of the `if` that keeps an existing model, the branch that trains."""
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    recipe = re.sub(r"\\\n\t\s*", " ", recipe)  # continuation lines joined
    commands = []
    for line in recipe.splitlines():
        line = line.strip()
        if line.startswith("@if "):
            fresh = line.split("else", 1)[1].rsplit("fi", 1)[0]
            commands += [part.strip() for part in fresh.split(";") if part.strip().startswith("$(VENV)")]
        elif not line.startswith("@echo"):
            commands.append(line)
    return [c.replace("$(VENV)/bin/chargpt", "chargpt") for c in commands]


def bash_words(line: str) -> list[str]:
    """The words bash makes of a command line (quotes, $'..' and comments handled by bash itself)."""
    r = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, check=True)
    return r.stdout.decode().split("\0")[:-1]


def run_chargpt(words: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    if words[:1] == ["train"] and "--add-time" in words:  # a resume's own budget: seconds, as RESUME_BUDGET's
        words = [*words[: words.index("--add-time") + 1], "2", *words[words.index("--add-time") + 2 :], "--quiet"]
    elif words[:1] == ["train"]:
        words = words + (RESUME_BUDGET if "--resume" in words else TRAIN_BUDGET)
    if words[:1] == ["sample"]:
        words = words + SAMPLE_BUDGET
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, 1 thread is faster and steadier (see chargpt.generate)
    try:
        rc = main(words)
    except SystemExit as e:
        rc = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return rc, out + err


def run_line(line: str, cwd: Path, capsys: pytest.CaptureFixture) -> None:
    skip = next((why for start, why in SKIP.items() if line.startswith(start)), None)
    if skip:
        return
    if line.startswith("make demo"):
        for command in demo_recipe():
            run_line(command, cwd, capsys)
        return
    if line.startswith("chargpt "):
        rc, output = run_chargpt(bash_words(line)[1:], capsys)
        assert rc == 0, f"{line}\n{output[-2000:]}"
        return
    venv = str(Path(sys.executable).parent)
    r = subprocess.run(["bash", "-c", f'PATH="{venv}:$PATH"; {line}'], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"


@pytest.mark.end_to_end
def test_every_readme_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    ran = {"python": 0, "toml": 0, "sh": 0}
    for info, body in blocks():
        if info == "python" and SERVER_CLIENT in body:
            continue
        if info == "python":
            body = body.replace(*PYTHON_BUDGET)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in run_chargpt
            r = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=600, env=env)
            assert r.returncode == 0, r.stderr[-3000:]
            if "onnxruntime" in body:  # the export section: greedy text from the ONNX file
                text = r.stdout.removesuffix("\n")  # print's newline (the text itself may end in newlines)
                assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 100, r.stdout
            else:  # the Python API section: a run sized for its seconds, which learned in them (at any speed)
                best_val, steps = r.stdout.splitlines()[0].split()
                run = tmp_path / "out" / "api-demo"
                untrained = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
                assert float(best_val) < untrained - 0.1 and int(steps) > 0, (best_val, untrained)
                saved = json.loads((run / "config.json").read_text())["info"]
                assert saved["settings_from"]["n_embd"] == "sized for the budget"
                assert "'loss'" in r.stdout.splitlines()[-1]
        elif info == "toml":
            name = body.splitlines()[0].removeprefix("#").strip()
            assert name.endswith(".toml"), "a toml block starts with `# NAME.toml`"
            (tmp_path / name).write_text(body, encoding="utf-8")
        elif info in ("sh", "bash", ""):
            for line in shell_lines(body):
                run_line(line, tmp_path, capsys)
        else:
            assert info in ("text", "mermaid"), f"a README block of unknown kind {info!r}"
            continue
        ran["sh" if info in ("sh", "bash", "") else info] += 1
    assert ran["python"] >= 2 and ran["toml"] >= 1 and ran["sh"] >= 6
    assert (tmp_path / "out" / "demo" / "model.safetensors").is_file()  # make demo's stand-in ran


def test_readme_has_no_indented_code_blocks() -> None:
    """Commands in 4-space-indented blocks would escape the test above: fence them."""
    outside = re.sub(r"^```.*?^```", "", README, flags=re.M | re.S)
    assert not re.findall(r"^    (chargpt|torchrun|make|python) ", outside, re.M)


SYNOPSES = [
    line.strip()
    for info, body in blocks()
    if info == "text"
    for line in body.splitlines()
    if line.strip().startswith("chargpt ") and "[" not in line
]


@pytest.mark.parametrize("command", SYNOPSES or ["chargpt info DIR"])
def test_text_block_commands_parse(command: str) -> None:
    words = shlex.split(command)
    assert build_parser().parse_args(words[1:]).command == words[1]
