"""Fine-tuning (`--init-from`): does starting from a Shakespeare model learn a new text faster than starting afresh?

Issue 21's benchmark: the default command trains 210 s on the complete Shakespeare plays; then, on a new text of
100-300 KB in another style (Python source from this interpreter's standard library: every machine has it, and
it has characters the plays lack), the same budget of 60 s trains (a) a fine-tune of that model and (b) the
default command from scratch. Each model is scored with `chargpt eval` on the new text's validation split (its
last 10%), and the base and fine-tuned models also on Shakespeare's (how much the fine-tune forgets). The
untouched model can only score characters it knows, so a second column scores every model on the validation
text with the new characters left out.

    python benchmarks/bench_finetune.py [--base-seconds 210] [--tune-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from chargpt.data.corpus import shakespeare_text
from chargpt.machine import cores
from chargpt.machine import precision as prec
from chargpt.storage.checkpoint import read_config
from cpuflags import shown_flags

NEW_TEXT_BYTES = 200_000


def new_text() -> str:
    """About 200 KB of Python source: the standard library's email package, then more modules in name order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((stdlib / "email").glob("*.py")) + sorted(stdlib.glob("*.py"))
    parts, size = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= NEW_TEXT_BYTES:
            break
    return "\n".join(parts)


def chargpt(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "chargpt", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench_finetune: chargpt {' '.join(args)} failed: {r.stderr.strip()[-500:]}")
    return r.stdout


def score(model: Path, text_file: Path) -> float:
    return json.loads(chargpt("eval", "--model", str(model), "--data", str(text_file), "--quiet"))["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-seconds", type=float, default=210)
    p.add_argument("--tune-seconds", type=float, default=60)
    args = p.parse_args()
    info = prec.cpu_info()
    print(f"CPU: {info.model}; flags: {shown_flags(info)}; cores {cores.cores()}; load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = new_text()
        cut = int(len(text) * 0.9)
        (work / "new.txt").write_text(text, encoding="utf-8")
        (work / "new-val.txt").write_text(text[cut:], encoding="utf-8")
        plays = shakespeare_text()
        (work / "plays-val.txt").write_text(plays[int(len(plays) * 0.9) :], encoding="utf-8")
        print(f"new text: {len(text.encode()):,} bytes of Python source, {len(set(text))} distinct characters")

        budget = ["--max-time", f"{args.base_seconds:g}", "--quiet"]
        chargpt("train", "--out", str(work / "base"), *budget)
        _, base_vocab, _ = read_config(work / "base")
        known = set(base_vocab.chars)
        (work / "new-val-known.txt").write_text("".join(c for c in text[cut:] if c in known), encoding="utf-8")
        print(f"characters of the new text the base model lacks: {sorted(set(text) - known)}")

        tune = ["--data", str(work / "new.txt"), "--max-time", f"{args.tune_seconds:g}", "--quiet"]
        chargpt("train", "--out", str(work / "tuned"), "--init-from", str(work / "base"), *tune)
        chargpt("train", "--out", str(work / "scratch"), *tune)

        rows = []
        for name in ("base", "tuned", "scratch"):
            model = work / name
            full = score(model, work / "new-val.txt") if name != "base" else float("nan")
            rows.append((name, full, score(model, work / "new-val-known.txt")))
        print(f"\n{'model':<10} {'new val':>8} {'new val, known chars':>21}")
        for name, full, known_only in rows:
            print(f"{name:<10} {full:>8.4f} {known_only:>21.4f}")
        before, after = score(work / "base", work / "plays-val.txt"), score(work / "tuned", work / "plays-val.txt")
        print(f"\nShakespeare val: base {before:.4f}, after fine-tuning {after:.4f} (forgetting {after - before:+.4f})")
        tuned, scratch = rows[1][1], rows[2][1]
        print(f"fine-tune vs scratch on the new text, {args.tune_seconds:g} s each: {tuned:.4f} vs {scratch:.4f}")


if __name__ == "__main__":
    main()
