"""The property sweep of the CLI's contract (tests/contract_sweep.py), in a child process whose address
space is capped: every generated bad input ends in exit code 2, at most two lines on stderr, no traceback,
and no file changed, in bounded memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = 150  # per sweep (flag values; broken model directories), fixed so CI runs the same cases


@pytest.mark.end_to_end
def test_the_contract_holds_for_generated_flags_and_model_directories(tmp_path: Path):
    script = Path(__file__).with_name("contract_sweep.py")
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(EXAMPLES)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert f"contract held for {EXAMPLES} flag sets and {EXAMPLES} broken model directories" in r.stdout
    print(r.stdout.strip())
