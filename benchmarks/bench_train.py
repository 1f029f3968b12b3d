"""Training throughput: chargpt vs ../shared/bench/reference_gpt.py, side by side, plus the matmul peak.

Mid config: n_embd 192, 6 heads, 4 layers, block 128, batch 32, dropout 0.2, vocab 65. Measures
forward + backward + optimizer step after warm-up, exactly what `chargpt train` runs per step: in fp32,
and under bf16 autocast (`--precision bf16`) where the CPU has native bf16 (or when asked with --bf16).

    python benchmarks/bench_train.py [--rounds 6] [--steps 4] [--compile] [--bf16]

The reference model is loaded from its file and trained in the same process, in alternating bursts with
chargpt, so both see the same machine state.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from chargpt.config import TrainConfig
from chargpt.machine import precision as prec
from chargpt.model import build_model
from chargpt.training.optim import make_optimizer
from cpuflags import shown_flags

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARGPT_SHARED", REPO.parent / "shared"))  # beside the repo, or say where
REFERENCE = SHARED / "bench" / "reference_gpt.py"
MID = dict(n_embd=192, n_heads=6, n_layers=4, block_size=128, batch_size=32, dropout=0.2)
VOCAB = 65


def matmul_peak(n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
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


def _load_reference():
    if not REFERENCE.is_file():
        sys.exit(f"bench_train: reference not found at {REFERENCE}; it ships in ../shared/bench beside the repo")
    spec = importlib.util.spec_from_file_location("reference_gpt", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chargpt_step(cfg: TrainConfig, compile_model: bool, precision: str = "fp32"):
    torch.manual_seed(0)
    model = build_model(cfg.model_config(VOCAB))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    fwd = torch.compile(model) if compile_model else model
    model.train()
    choice = prec.resolve(precision, "cpu", "train")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with prec.autocast("cpu", choice):
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def _reference_step(reference):
    """Exactly the step of `reference_gpt.py train`: its model, AdamW(lr=3e-4), no clipping."""
    torch.manual_seed(0)
    model = reference.ReferenceGPT(VOCAB, MID["block_size"], MID["n_embd"], MID["n_heads"], 4, MID["dropout"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def interleaved_tokens_per_s(steps: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Alternate short bursts of each contender, so machine drift hits all of them alike."""
    x = torch.randint(0, VOCAB, (MID["batch_size"], MID["block_size"]))
    y = torch.randint(0, VOCAB, (MID["batch_size"], MID["block_size"]))
    for step in steps.values():  # warm-up
        for _ in range(3):
            step(x, y)
    spent = dict.fromkeys(steps, 0.0)
    for r in range(rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            t0 = time.perf_counter()
            for _ in range(per_round):
                steps[name](x, y)
            spent[name] += time.perf_counter() - t0
    tokens = rounds * per_round * MID["batch_size"] * MID["block_size"]
    return {name: tokens / t for name, t in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="steps per burst")
    p.add_argument("--rounds", type=int, default=6, help="bursts per contender, alternating")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--bf16", action="store_true", help="measure bf16 autocast even without native bf16 (slow)")
    a = p.parse_args()
    info = prec.cpu_info()
    bf16 = a.bf16 or bool(info.native_bf16)
    print(f"CPU: {info.model}; flags: {shown_flags(info)}; torch {torch.__version__} capability {info.capability}")
    peak = matmul_peak()
    cfg = TrainConfig(**MID, device="cpu")
    model, ours_step = _chargpt_step(cfg, compile_model=False)
    steps = {"reference": _reference_step(_load_reference()), "chargpt": ours_step}
    if bf16:
        steps["chargpt_bf16"] = _chargpt_step(cfg, compile_model=False, precision="bf16")[1]
    if a.compile:
        steps["compiled"] = _chargpt_step(cfg, compile_model=True)[1]
    rates = interleaved_tokens_per_s(steps, rounds=a.rounds, per_round=a.steps)
    peak = max(peak, matmul_peak())  # the better of before and after
    ref, ours, fpt = rates["reference"], rates["chargpt"], flops_per_token(model, cfg)
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
        comp = rates["compiled"]
        result.update(
            chargpt_compiled_tokens_per_s=round(comp),
            compiled_ratio=round(comp / ref, 2),
            compiled_share_of_peak=round(comp * fpt / peak, 3),
        )
    if bf16:
        bf16_peak = matmul_peak(reps=3, dtype=torch.bfloat16)
        result.update(
            matmul_peak_bf16_gflops=round(bf16_peak / 1e9, 1),
            chargpt_bf16_tokens_per_s=round(rates["chargpt_bf16"]),
            bf16_speedup=round(rates["chargpt_bf16"] / ours, 2),
        )
    print(f"matmul peak (fp32, 2048^2): {result['matmul_peak_gflops']} GFLOP/s on {result['threads']} threads")
    print(f"reference: {ref:,.0f} tokens/s  ({result['reference_share_of_peak']:.0%} of peak)")
    print(f"chargpt:   {ours:,.0f} tokens/s  ({result['chargpt_share_of_peak']:.0%} of peak)  ratio {ours / ref:.2f}x")
    if bf16:
        print(
            f"chargpt bf16 autocast: {result['chargpt_bf16_tokens_per_s']:,} tokens/s = {result['bf16_speedup']}x "
            f"fp32 (bf16 matmul peak {result['matmul_peak_bf16_gflops']} GFLOP/s)"
        )
    else:
        print("bf16: not measured (this CPU has no native bf16: avx512_bf16 / amx_bf16; --bf16 forces it)")
    if a.compile:
        print(
            f"compiled:  {result['chargpt_compiled_tokens_per_s']:,} tokens/s  "
            f"({result['compiled_share_of_peak']:.0%} of peak)  ratio {result['compiled_ratio']:.2f}x"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
