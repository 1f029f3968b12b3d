"""Sampling speed: chargpt (exact KV cache) vs ../shared/bench/reference_gpt.py, side by side, same run.

The seed-config model (vocab 65, block 256, n_embd 384, 6 heads, 6 layers; random weights from a fixed seed,
eval mode, fp32, CPU) continues a 1-character prompt for 300 characters, sampling at temperature 1 like the
reference. Inside the window (the first 256 tokens) each token costs one single-position forward through the
cache. Past block_size the model must see exactly what the no-cache model sees, the last 256 tokens at
positions 0..255, so every position shifts at every step and each token costs a full 256-token forward (the
reference pays that too, and a growing-context forward for every token before it).

    python benchmarks/bench_sample.py [--tokens 300] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from chargpt.config import GPTConfig
from chargpt.generate import stream
from chargpt.model import GPT
from chargpt.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "bench" / "reference_gpt.py"
VOCAB = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))  # the seed's 65


def seed_model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=len(VOCAB), block_size=256, n_embd=384, n_heads=6, n_layers=6, dropout=0.2)
    return GPT(cfg).float().eval()


def chargpt_step_times(model: GPT, tokens: int) -> list[float]:
    """Seconds from the start to each generated character (a streamed chunk is one character here)."""
    tokenizer = CharTokenizer(VOCAB)
    t0 = time.perf_counter()
    stamps = [time.perf_counter() - t0 for _ in stream(model, tokenizer, "\n", max_new_tokens=tokens, seed=0)]
    assert len(stamps) == tokens
    return stamps


def reference_rate(tokens: int, env: dict[str, str]) -> float:
    if not REFERENCE.is_file():
        sys.exit(
            f"bench_sample: the reference implementation is missing: {REFERENCE} "
            "(expected at ../shared/bench/reference_gpt.py next to the repository)"
        )
    cmd = [sys.executable, str(REFERENCE), "generate", "--tokens", str(tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--threads", type=int, help="torch threads for both chargpt and the reference (default: torch's)")
    a = p.parse_args()
    env = dict(os.environ)
    if a.threads:
        torch.set_num_threads(a.threads)
        env["OMP_NUM_THREADS"] = str(a.threads)
    window = 255  # characters that all fit the 256-token window after the 1-character prompt

    model = seed_model()
    chargpt_step_times(model, 8)  # warm-up: first-call allocations, not part of steady-state sampling
    stamps = chargpt_step_times(model, a.tokens)
    steps = [t1 - t0 for t0, t1 in zip([0.0, *stamps[:-1]], stamps, strict=True)]
    inside = statistics.median(steps[1:window])  # one-token forwards through the cache (step 0 is the prefill)
    past = statistics.median(steps[window + 1 :]) if a.tokens > window + 1 else float("nan")
    ours = a.tokens / stamps[-1]
    ours_window = window / stamps[window - 1] if a.tokens >= window else float("nan")

    ref = reference_rate(a.tokens, env)
    ref_window = reference_rate(window, env) if a.tokens >= window else float("nan")

    print(f"threads: {torch.get_num_threads()}  model: {model.num_params() / 1e6:.1f}M params, fp32, CPU")
    print(f"reference  {a.tokens} chars: {ref:8.1f} chars/s   ({window} chars: {ref_window:.1f} chars/s)")
    print(f"chargpt    {a.tokens} chars: {ours:8.1f} chars/s   ({window} chars: {ours_window:.1f} chars/s)")
    print(f"ratio      {a.tokens} chars: {ours / ref:8.1f}x        ({window} chars, all in the window: "
          f"{ours_window / ref_window:.1f}x)")  # fmt: skip
    print(
        f"per token  inside the window: {inside * 1e3:.2f} ms (one position through the cache); "
        f"past it: {past * 1e3:.1f} ms (a full {model.config.block_size}-token forward, needed for exactness)"
    )
    print(
        json.dumps(
            {
                "bench": "sample",
                "tokens": a.tokens,
                "threads": torch.get_num_threads(),
                "reference_chars_per_s": round(ref, 2),
                "chargpt_chars_per_s": round(ours, 2),
                "ratio": round(ours / ref, 2),
                "reference_chars_per_s_255": round(ref_window, 2),
                "chargpt_chars_per_s_255": round(ours_window, 2),
                "ratio_255": round(ours_window / ref_window, 2),
                "ms_per_token_inside_window": round(inside * 1e3, 3),
                "ms_per_token_past_window": round(past * 1e3, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
