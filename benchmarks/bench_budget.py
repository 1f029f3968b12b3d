"""How well a --max-time run uses its budget: the loop (evaluations, the plot and the saves included) ends within
the budget (late by at most 2% and SLACK, 0.25 s, on a machine that turns busier), and early by no more than what
it keeps for its last step, evaluation, plot and save.

    python benchmarks/bench_budget.py [--budgets 8 30] [--rounds 2]

Targets (the loop's own clock, set-up excluded): used >= 0.85 of the budget, never over 1.02 x it + SLACK. The
test suite checks the upper bound at any speed (tests/test_train.py); how much of the budget a run uses depends
on the machine's speed and load, so it is measured here. Each run: the suite's tiny model (2 x 48, context 32) on
80k characters of the built-in plays, one thread, fp32, evaluations every 25 steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chargpt.config import TrainConfig
from chargpt.data.corpus import shakespeare_text
from chargpt.machine import precision as prec
from chargpt.training.budget import SLACK
from chargpt.training.loop import train
from cpuflags import shown_flags


def config(out: Path, data: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(
        data=str(data), out=str(out), block_size=32, n_embd=48, n_heads=4, n_layers=2, dropout=0.0, batch_size=16,
        learning_rate=3e-3, warmup_updates=5, eval_iters=4, device="cpu", seed=7, precision="fp32", threads=1,
    )  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[8.0, 30.0])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    info = prec.cpu_info()
    print(f"CPU: {info.model}; flags: {shown_flags(info)}; load {os.getloadavg()}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "plays.txt"
        data.write_text(shakespeare_text()[:80_000], encoding="utf-8")
        train(config(work / "warm", data, n_updates=2, eval_interval=1), progress=False)  # first-call costs
        for budget in args.budgets:
            used, over = [], []
            for i in range(args.rounds):
                cfg = config(work / f"b{budget:g}-{i}", data, n_updates=None, max_time=budget, eval_interval=25,
                             checkpoint_interval=50)  # fmt: skip
                start = time.perf_counter()
                result = train(cfg, progress=False)
                wall = time.perf_counter() - start
                used.append(result.elapsed / budget)
                over.append(wall / budget)
            print(
                f"--max-time {budget:g}: the loop used {statistics.median(used):.3f} of it (target >= 0.85; runs "
                f"{', '.join(f'{u:.3f}' for u in used)}); the whole call {max(over):.3f} x the budget at most "
                f"(target <= 1.02 plus {SLACK:g} s and set-up); load {os.getloadavg()[0]:.2f}"
            )


if __name__ == "__main__":
    main()
