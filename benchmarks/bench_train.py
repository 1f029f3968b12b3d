"""Training throughput: chargpt vs ../shared/bench/reference_gpt.py, side by side, plus the matmul peak.

Mid config: n_embd 192, 6 heads, 4 layers, block 128, batch 32, dropout 0.2, vocab 65. Measures
forward + backward + optimizer step after warm-up, exactly what `chargpt train` runs per step.

    python benchmarks/bench_train.py [--steps 20] [--compile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from chargpt.config import TrainConfig
from chargpt.model import build_model
from chargpt.train import make_optimizer

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "bench" / "reference_gpt.py"
MID = dict(n_embd=192, n_heads=6, n_layers=4, block_size=128, batch_size=32, dropout=0.2)
VOCAB = 65


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def flops_per_token(model: torch.nn.Module, cfg: TrainConfig) -> float:
    """The issue's (and nanoGPT's) estimate: 6 x non-embedding params + 12 x n_layers x n_embd x block_size."""
    return 6 * model.num_params(non_embedding=True) + 12 * cfg.n_layers * cfg.n_embd * cfg.block_size


def chargpt_tokens_per_s(steps: int, warmup: int, compile_model: bool) -> tuple[float, float]:
    cfg = TrainConfig(**MID, compile=compile_model, device="cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model_config(VOCAB))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    fwd = torch.compile(model) if compile_model else model
    x = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size))
    y = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size))
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return steps * cfg.batch_size * cfg.block_size / dt, flops_per_token(model, cfg)


def reference_tokens_per_s(steps: int) -> float:
    if not REFERENCE.is_file():
        sys.exit(f"bench_train: reference not found at {REFERENCE}; it ships in ../shared/bench beside the repo")
    args = ["--n-embd", "192", "--n-heads", "6", "--n-layers", "4", "--block-size", "128", "--batch-size", "32"]
    out = subprocess.run(
        [sys.executable, str(REFERENCE), "train", "--steps", str(steps), "--warmup", "3", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    a = p.parse_args()
    peak = matmul_peak()
    ref = reference_tokens_per_s(a.steps)
    ours, fpt = chargpt_tokens_per_s(a.steps, warmup=3, compile_model=False)
    result = {
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "reference_tokens_per_s": round(ref),
        "chargpt_tokens_per_s": round(ours),
        "ratio": round(ours / ref, 2),
        "flops_per_token": fpt,
        "chargpt_share_of_peak": round(ours * fpt / peak, 3),
        "reference_share_of_peak": round(ref * fpt / peak, 3),
    }
    if a.compile:
        comp, _ = chargpt_tokens_per_s(a.steps, warmup=3, compile_model=True)
        result.update(
            chargpt_compiled_tokens_per_s=round(comp),
            compiled_ratio=round(comp / ref, 2),
            compiled_share_of_peak=round(comp * fpt / peak, 3),
        )
    print(f"matmul peak (fp32, 2048^2): {result['matmul_peak_gflops']} GFLOP/s on {result['threads']} threads")
    print(f"reference: {ref:,.0f} tokens/s  ({result['reference_share_of_peak']:.0%} of peak)")
    print(f"chargpt:   {ours:,.0f} tokens/s  ({result['chargpt_share_of_peak']:.0%} of peak)  ratio {ours / ref:.2f}x")
    if a.compile:
        print(
            f"compiled:  {result['chargpt_compiled_tokens_per_s']:,} tokens/s  "
            f"({result['compiled_share_of_peak']:.0%} of peak)  ratio {result['compiled_ratio']:.2f}x"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
