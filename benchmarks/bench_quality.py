"""Time-to-quality: `chargpt train` on tinyshakespeare for a fixed wall-clock budget, then `chargpt eval` of the
best checkpoint on the validation text (the last 10%).

    python benchmarks/bench_quality.py [--max-time 210 900 1800] [--variants default cpu] [--precision auto]
                                       [--out out/bench-quality] [extra train flags...]

Each budget runs each variant one after the other in the same benchmark: `default` is the default command
(`chargpt train --data ... --max-time T`: on a CPU the model is sized to the budget, chargpt.sizing) and `cpu`
is `--preset cpu` (the fixed 0.8M-parameter preset of rounds 1-2, AdamW with a cosine schedule).
Issue 18's targets: default beats cpu by >= 0.02 at 210 s, >= 0.05 at 900 s, >= 0.08 at 1800 s; auto precision
never worse than fp32 by more than 0.01. Issue 4: val loss <= 1.70 after 210 s. Issue 23: the best checkpoint
is also scored with int8 weights (`chargpt eval --quantize int8`); target: the loss changes by <= 0.01 nats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chargpt.machine import precision as prec
from cpuflags import shown_flags

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARGPT_SHARED", REPO.parent / "shared"))  # beside the repo, or say where
CORPUS = SHARED / "data" / "tinyshakespeare.txt"


def run(data: Path, val_text: str, max_time: float, out: str, variant: str, precision: str, extra: list[str]) -> dict:
    """One `chargpt train ... --max-time` run (the default command, or a preset), then `chargpt eval` of its best
    checkpoint, with and without int8 weights."""
    chargpt = [sys.executable, "-m", "chargpt"]
    preset = [] if variant == "default" else ["--preset", variant]
    t0 = time.perf_counter()
    trained = subprocess.run(
        [*chargpt, "train", "--data", str(data), *preset, "--max-time", str(max_time), "--out", out]
        + ["--overwrite", "--precision", precision, *extra],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    lines = (trained.stdout + trained.stderr).splitlines()
    announced = next((line for line in lines if line.startswith("training a")), "")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(val_text)
    scored = subprocess.run(
        [*chargpt, "eval", "--model", out, "--data", f.name, "--precision", "fp32", "--quantize", "int8"],
        check=True,
        capture_output=True,
        text=True,
    )
    Path(f.name).unlink()
    result = json.loads(scored.stdout)
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((Path(out) / "config.json").read_text())
    train_cfg = config["info"]["train_config"]
    return {
        "variant": variant,
        "precision": precision,
        "max_time_s": max_time,
        "train_wall_s": round(wall, 1),
        "steps": metrics[-1]["step"],
        "best_step": config["info"]["step"],
        "val_loss": round(result["loss_unquantized"], 4),
        "val_loss_int8": round(result["loss"], 4),
        "int8_change": round(result["loss"] - result["loss_unquantized"], 4),
        "tokens_per_s": round(metrics[-1]["tokens_per_s"]),
        "model": config["model"],
        "settings": {
            k: train_cfg[k] for k in ("batch_size", "optimizer", "schedule", "learning_rate", "dropout", "weight_decay")
        },
        "announced": announced,
        "plot": str(Path(out) / "loss.png"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-time", type=float, nargs="+", default=[210.0])
    p.add_argument("--variants", nargs="+", default=["default", "cpu"], help="default (the default command) or "
                   "a preset name")  # fmt: skip
    p.add_argument("--out", default="out/bench-quality")
    p.add_argument("--data", default=str(CORPUS))
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "auto"), default=["auto"])
    p.add_argument("--side-by-side", action="store_true", help="run the variants at the same time, --threads 1 "
                   "each (one core each on 2 cores: half the wall time; each run has a busy neighbour)")  # fmt: skip
    a, extra = p.parse_known_args()
    data = Path(a.data)
    if not data.is_file():
        sys.exit(f"bench_quality: {data} not found; it ships in ../shared/data beside the repo")
    info = prec.cpu_info()
    print(f"CPU: {info.model}; flags: {shown_flags(info)}; cores {os.cpu_count()}; load {os.getloadavg()[0]:.2f}")
    text = data.read_text(encoding="utf-8")
    val_text = text[len(text) - int(len(text) * 0.1) :]
    for budget in a.max_time:
        results = {}
        jobs = [(variant, name) for variant in a.variants for name in a.precision]

        def one(job: tuple[str, str], budget: float = budget) -> dict:
            variant, name = job
            out = f"{a.out}-{budget:g}s-{variant}-{name}"
            return run(
                data, val_text, budget, out, variant, name, extra + (["--threads", "1"] if a.side_by_side else [])
            )

        if a.side_by_side:  # every run at once, one thread each: each is the other's busy machine
            with ThreadPoolExecutor(len(jobs)) as pool:
                done = dict(zip(jobs, pool.map(one, jobs), strict=True))
        else:
            done = {}
            for job in jobs:
                done[job] = one(job)
        for (variant, name), r in done.items():
            results[(variant, name)] = r
            load = os.getloadavg()[0]
            print(f"{budget:g}s {variant} ({name}): val loss {r['val_loss']:.4f} nats/char, {r['steps']} steps, "
                  f"{r['tokens_per_s']:,} tokens/s, int8 {r['int8_change']:+.4f}; load {load:.2f}")  # fmt: skip
            print(f"  {r['announced']}")
            print(json.dumps(r), flush=True)
        if len(a.variants) >= 2:
            first, second = a.variants[:2]
            for name in a.precision:
                diff = results[(first, name)]["val_loss"] - results[(second, name)]["val_loss"]
                print(f"{budget:g}s ({name}): {first} - {second} = {diff:+.4f} nats/char (negative: {first} is better)")
        if "fp32" in a.precision and len(a.precision) > 1:
            for variant in a.variants:
                for name in a.precision:
                    if name != "fp32":
                        diff = results[(variant, name)]["val_loss"] - results[(variant, "fp32")]["val_loss"]
                        print(f"{budget:g}s {variant}: {name} - fp32 = {diff:+.4f} (target <= +0.01)")


if __name__ == "__main__":
    main()
