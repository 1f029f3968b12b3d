"""The README stays true: its Python example runs, and every `chargpt` command in it parses."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from chargpt.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    """Fenced code blocks whose info string is `lang` ("" = plain fences)."""
    blocks, current, inside = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside, current = line[3:].strip(), []
            else:
                if inside == lang:
                    blocks.append("\n".join(current) + "\n")
                inside = None
        elif inside is not None:
            current.append(line)
    return blocks


def test_python_example_runs(tmp_path: Path, corpus_text: str) -> None:
    (code,) = [block for block in _blocks("python") if "chargpt.train(" in block]  # the serving one: test_serve.py
    (tmp_path / "input.txt").write_text(corpus_text[:40_000], encoding="utf-8")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    best_val, steps = lines[0].split()
    assert float(best_val) < 3.5 and int(steps) == 200
    assert "'loss'" in lines[-1] and (tmp_path / "out/api-demo/model.safetensors").is_file()


COMMANDS = [
    line.strip()
    for block in _blocks("")
    for line in block.splitlines()
    if line.strip().startswith("chargpt ") and "[" not in line
]


def test_readme_has_commands() -> None:
    assert len(COMMANDS) >= 6


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command: str) -> None:
    words = shlex.split(command.split("#")[0].replace("$'\\n\\n'", "X"))
    args = build_parser().parse_args(words[1:])
    assert args.command == words[1]
