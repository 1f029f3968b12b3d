"""Training on a busy machine: the default command's tokens/s with one core kept busy by another process.

Issue 18's target: with one core spinning, `chargpt train` (auto threads) reaches >= 0.8x the tokens/s of the
same command with the thread count pinned to the free cores; on a quiet machine it loses nothing (>= 0.97x)
against the same command pinned to every core (torch's old default).

    python benchmarks/bench_contention.py [--steps 150] [--rounds 2]

Each figure is the median training-row tokens/s of one `chargpt train` run (the cpu preset on the built-in
Shakespeare, fp32), the runs alternating so that both see the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chargpt.machine import cores
from chargpt.machine import precision as prec
from cpuflags import shown_flags


def run(steps: int, threads: int | None, out: Path) -> float:
    """Median tokens/s of the training rows of one run (the first rows, warm-up, left out)."""
    cmd = [sys.executable, "-m", "chargpt", "train", "--out", str(out), "--overwrite", "--quiet", "--device=cpu"]
    cmd += [f"--n-updates={steps}", "--eval-interval=100000", "--checkpoint-interval=0", "--log-interval=10"]
    cmd += ["--precision=fp32"] + ([f"--threads={threads}"] if threads else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r["kind"] == "train"][2:]
    return statistics.median(rates)


def compare(label: str, steps: int, rounds: int, pinned: int, work: Path) -> None:
    auto, fixed = [], []
    for _ in range(rounds):  # alternating
        auto.append(run(steps, None, work / "auto"))
        fixed.append(run(steps, pinned, work / "pinned"))
    a, f = statistics.median(auto), statistics.median(fixed)
    print(f"{label}: auto threads {a:,.0f} tok/s, --threads {pinned} {f:,.0f} tok/s, ratio {a / f:.2f}x")
    print(f"  runs: auto {[round(x) for x in auto]}, pinned {[round(x) for x in fixed]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    info = prec.cpu_info()
    total = cores.cores()
    print(f"CPU: {info.model}; flags: {shown_flags(info)}; cores {total}; load {os.getloadavg()}")
    if total < 2:
        sys.exit("bench_contention needs at least 2 cores (one to keep busy)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        compare("quiet machine", args.steps, args.rounds, total, work)
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            compare("one core busy", args.steps, args.rounds, total - 1, work)
            compare("one core busy, vs every core", args.steps, 1, total, work)
        finally:
            spinner.kill()
            spinner.wait()


if __name__ == "__main__":
    main()
