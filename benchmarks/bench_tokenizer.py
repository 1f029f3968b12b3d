"""Tokenizer speed: encode and decode MB/s on ASCII text (tinyshakespeare x 10) and on non-ASCII text.

python benchmarks/bench_tokenizer.py          (target, issue 2: encode >= 50 MB/s on ASCII)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from chargpt.data.corpus import shakespeare_text
from chargpt.data.tokenizer import CharTokenizer

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def rate(fn, n_chars: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_chars / best / 1e6


def main() -> None:
    base = CORPUS.read_text(encoding="utf-8") if CORPUS.is_file() else shakespeare_text()[:1_100_000]
    result = {}
    for name, text in (("ascii", base * 10), ("non_ascii", (base + "é—") * 10)):
        tok = CharTokenizer.from_text(text)
        ids = tok.encode(text)
        result[f"{name}_encode_mb_s"] = round(rate(lambda t=text, k=tok: k.encode(t), len(text)))
        result[f"{name}_decode_mb_s"] = round(rate(lambda i=ids, k=tok: k.decode(i), len(text)))
        print(f"{name:>9}: {len(text) / 1e6:.1f}M chars, encode {result[f'{name}_encode_mb_s']} MB/s, "
              f"decode {result[f'{name}_decode_mb_s']} MB/s")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
