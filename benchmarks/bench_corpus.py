"""Big corpora: a 2 GB text tokenized into the token cache, reopened, and trained on through the memory map.

    python benchmarks/bench_corpus.py [--size-gb 2] [--steps 200] [--dir DIR] [--keep]

Generates SIZE GB of UTF-8 text from the embedded Shakespeare (its lines shuffled, block after block) in a
temporary folder, then measures, each stage in a fresh child process (its peak RSS is its own):
  1. the first tokenization (both passes, the fsync included): MB/s and peak RSS;
  2. reopening the cache: seconds;
  3. training tokens/s on the memory-mapped corpus vs on tinyshakespeare in memory (the data path before
     the token cache: the whole text in memory as an int64 tensor), same config: `chargpt.train` runs
     in the order A B B A, so that machine drift hits both alike, with their peak RSS; and, in one
     process, bursts of training steps that alternate between the two data sources (the same model),
     which isolates what the memory map costs from the noise of separate runs.
Targets (issue 12): tokenization >= 100 MB/s; peak RSS < 1 GB at every stage; reopening < 0.5 s; training
tokens/s within 5% of the in-memory run. Everything it wrote is deleted at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chargpt.machine import precision as prec
from cpuflags import shown_flags

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARGPT_SHARED", REPO.parent / "shared"))  # beside the repo, or say where
TINY = SHARED / "data" / "tinyshakespeare.txt"
# the CPU preset's model and batch; evaluation only at the end (it is not counted in training time)
TRAIN = dict(block_size=128, n_embd=128, n_heads=4, n_layers=4, dropout=0.0, batch_size=16, learning_rate=3e-3,
             warmup_updates=50, eval_iters=10, device="cpu", seed=1337)  # fmt: skip


def machine() -> dict:
    cpu = prec.cpu_info()
    return {
        "cpu": cpu.model,
        "flags": shown_flags(cpu),
        "cores": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def generate(path: Path, size: int, seed: int = 0, n_blocks: int = 16) -> int:
    """SIZE bytes (a little more: whole blocks) of the embedded plays' lines: 16 blocks of the lines in a
    random order each (4.8 MB a block), written in a random order (reshuffling per block is too slow)."""
    from chargpt.data.corpus import shakespeare_text

    lines = shakespeare_text().splitlines(keepends=True)
    rng = random.Random(seed)
    blocks = []
    for _ in range(n_blocks):
        rng.shuffle(lines)
        blocks.append("".join(lines).encode("utf-8"))
    written = 0
    with open(path, "wb") as f:
        while written < size:
            block = rng.choice(blocks)
            f.write(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
    return written


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads: what the work costs on an idle machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# ---------------------------------------------------------------------------------------------
# stages, each run in a child process: `bench_corpus.py --stage NAME ...` prints one JSON line


def stage_tokenize(path: str, cache: str) -> dict:
    from chargpt.data.corpus import tokenize_corpus, vocab_policy

    t0, cpu0 = time.perf_counter(), cpu_seconds()
    tokens = tokenize_corpus(path, vocab_policy("auto", 1), Path(cache))
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"seconds": seconds, "cpu_seconds": cpu, "built": tokens.built, "count": len(tokens.ids),
            "vocab": tokens.tokenizer.vocab_size, "dtype": str(tokens.ids.dtype), "rss_mb": peak_rss_mb()}  # fmt: skip


def stage_train(path: str, cache: str, steps: int, in_memory: bool, threads: int) -> dict:
    import importlib

    import torch

    if threads:
        torch.set_num_threads(threads)
    from chargpt.config import TrainConfig
    from chargpt.data.corpus import Corpus, load_corpus, split
    from chargpt.data.tokenizer import CharTokenizer

    train_module = importlib.import_module("chargpt.training.loop")
    if in_memory:  # the data path before the token cache

        def prepare(cfg, tokenizer=None, dist_info=None, progress=False):
            text = load_corpus(cfg.data)
            tokenizer = tokenizer or CharTokenizer.from_text(text)
            train_ids, val_ids = split(torch.from_numpy(tokenizer.encode(text)), cfg.val_fraction, cfg.block_size)
            return Corpus(tokenizer, train_ids, val_ids, None, True)

        train_module.prepare_data = prepare
    out = tempfile.mkdtemp(prefix="bench-corpus-model-", dir=Path(cache).parent)
    cfg = TrainConfig(data=path, out=out, token_cache=cache, n_updates=steps, eval_interval=steps,
                      checkpoint_interval=steps, **TRAIN)  # fmt: skip
    t0 = time.perf_counter()
    result = train_module.train(cfg, progress=False)
    wall = time.perf_counter() - t0
    shutil.rmtree(out)
    tokens = result.step * cfg.batch_size * cfg.block_size
    return {"tokens_per_s": tokens / result.elapsed, "train_seconds": result.elapsed, "wall_seconds": wall,
            "threads": torch.get_num_threads(), "rss_mb": peak_rss_mb()}  # fmt: skip


def stage_interleaved(path: str, tiny: str, cache: str, rounds: int, threads: int) -> dict:
    """Bursts of 10 steps of one model, alternating: batches from the memory map, batches from a tensor."""
    import torch

    from chargpt.config import TrainConfig
    from chargpt.data.corpus import get_batch, load_corpus, tokenize_corpus, vocab_policy
    from chargpt.data.tokenizer import CharTokenizer
    from chargpt.model import build_model
    from chargpt.training.optim import make_optimizer

    if threads:
        torch.set_num_threads(threads)
    mapped = tokenize_corpus(path, vocab_policy("auto", 1), Path(cache))
    text = load_corpus(tiny)
    in_memory = torch.from_numpy(CharTokenizer.from_text(text).encode(text))
    cfg = TrainConfig(**TRAIN)
    model = build_model(cfg.model_config(mapped.tokenizer.vocab_size))  # the larger vocabulary serves both
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    sources = {"mapped": mapped.ids, "in_memory": in_memory}
    gens = {name: torch.Generator().manual_seed(0) for name in sources}
    spent = dict.fromkeys(sources, 0.0)

    def burst(name: str, n: int = 10) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = get_batch(sources[name], cfg.batch_size, cfg.block_size, gens[name])
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    burst("mapped", 3), burst("in_memory", 3)  # warm-up
    for r in range(rounds):
        for name in ("mapped", "in_memory") if r % 2 == 0 else ("in_memory", "mapped"):
            spent[name] += burst(name)
    tokens = rounds * 10 * cfg.batch_size * cfg.block_size
    return {name: tokens / t for name, t in spent.items()}


def child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--stage", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_corpus: stage {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def run(size: int, steps: int, base: Path, tiny: Path, threads: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-corpus-", dir=base))
    try:
        text, cache = work / "big.txt", work / "cache"
        t0 = time.perf_counter()
        size = generate(text, size)
        print(f"generated {size / 1e9:.2f} GB of text in {time.perf_counter() - t0:.0f} s: {text}", flush=True)
        time.sleep(1.1)  # older than the cache's 1 s "racy" window, as a corpus that was not just written is
        first = child("tokenize", str(text), str(cache))
        assert first["built"], first
        mb_s = size / 1e6 / first["seconds"]
        ids = f"{first['count']:,} ids as {first['dtype']}, vocabulary {first['vocab']}"
        print(f"1. first tokenization: {mb_s:.0f} MB/s ({first['seconds']:.1f} s, {ids}), "
              f"peak RSS {first['rss_mb']:.0f} MB; CPU time {first['cpu_seconds']:.1f} s "
              f"({size / 1e6 / first['cpu_seconds']:.0f} MB per CPU-second)", flush=True)  # fmt: skip
        second = child("tokenize", str(text), str(cache))
        assert not second["built"], second
        print(
            f"2. reopening the cache: {second['seconds'] * 1e3:.1f} ms, peak RSS {second['rss_mb']:.0f} MB", flush=True
        )
        tiny = tiny if tiny.is_file() else _tiny_stand_in(work)
        runs: dict[str, list[dict]] = {"mapped": [], "in_memory": []}
        for name in ("mapped", "in_memory", "in_memory", "mapped"):
            data = text if name == "mapped" else tiny
            r = child("train", str(data), str(cache), str(steps), str(name == "in_memory"), str(threads))
            runs[name].append(r)
            print(f"   {name:>9}: {r['tokens_per_s']:,.0f} tokens/s over {steps} steps, peak RSS {r['rss_mb']:.0f} MB",
                  flush=True)  # fmt: skip
        rate = {k: sum(r["tokens_per_s"] for r in v) / len(v) for k, v in runs.items()}
        ratio = rate["mapped"] / rate["in_memory"]
        train_rss = max(r["rss_mb"] for r in runs["mapped"])
        print(f"3. training: {rate['mapped']:,.0f} tokens/s memory-mapped vs {rate['in_memory']:,.0f} in memory "
              f"({ratio:.3f}x); peak RSS {train_rss:.0f} MB", flush=True)  # fmt: skip
        mixed = child("interleaved", str(text), str(tiny), str(cache), "10", str(threads))
        mixed_ratio = mixed["mapped"] / mixed["in_memory"]
        print(f"   interleaved bursts in one process: {mixed['mapped']:,.0f} tokens/s memory-mapped vs "
              f"{mixed['in_memory']:,.0f} in memory ({mixed_ratio:.3f}x)", flush=True)  # fmt: skip
        return {
            "corpus_bytes": size,
            "tokenize_mb_s": round(mb_s, 1),
            "tokenize_seconds": round(first["seconds"], 2),
            "tokenize_rss_mb": round(first["rss_mb"]),
            "tokenize_cpu_seconds": round(first["cpu_seconds"], 2),
            "reopen_ms": round(second["seconds"] * 1e3, 2),
            "reopen_rss_mb": round(second["rss_mb"]),
            "train_mapped_tokens_per_s": round(rate["mapped"]),
            "train_in_memory_tokens_per_s": round(rate["in_memory"]),
            "train_ratio": round(ratio, 3),
            "train_rss_mb": round(train_rss),
            "interleaved_mapped_tokens_per_s": round(mixed["mapped"]),
            "interleaved_in_memory_tokens_per_s": round(mixed["in_memory"]),
            "interleaved_ratio": round(mixed_ratio, 3),
            "runs": {k: [round(r["tokens_per_s"]) for r in v] for k, v in runs.items()},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tiny_stand_in(work: Path) -> Path:
    """1.1 MB of the embedded plays, where ../shared/data/tinyshakespeare.txt is not beside the repo."""
    from chargpt.data.corpus import shakespeare_text

    path = work / "tiny.txt"
    path.write_text(shakespeare_text()[:1_115_394], encoding="utf-8")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary corpus and cache go")
    p.add_argument("--tiny", default=str(TINY), help="tinyshakespeare.txt (default: ../shared/data beside the repo)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = torch's default)")
    p.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage:
        name, *args = a.stage
        if name == "tokenize":
            print(json.dumps(stage_tokenize(*args)))
        elif name == "interleaved":
            print(json.dumps(stage_interleaved(args[0], args[1], args[2], int(args[3]), int(args[4]))))
        else:
            print(json.dumps(stage_train(args[0], args[1], int(args[2]), args[3] == "True", int(args[4]))))
        return
    size = int(a.size_gb * 1e9)
    free = shutil.disk_usage(a.dir).free
    if free < 2.5 * size:  # the text, its uint8 token file, and room to spare
        sys.exit(f"bench_corpus: {a.dir} has {free / 1e9:.1f} GB free, {2.5 * size / 1e9:.1f} GB are needed; use --dir")
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, flags {info['flags']}, "
          f"load average {info['load_1min']} (a loaded machine makes every figure slower)", flush=True)  # fmt: skip
    result = run(size, a.steps, Path(a.dir), Path(a.tiny), a.threads)
    result["threads"] = a.threads or "default"
    result["machine"] = {**info, "load_1min_after": round(os.getloadavg()[0], 2)}
    peak = max(result["tokenize_rss_mb"], result["reopen_rss_mb"], result["train_rss_mb"])
    checks = {
        "tokenize >= 100 MB/s": result["tokenize_mb_s"] >= 100,
        "peak RSS < 1 GB at every stage": peak < 1024,
        "reopen < 0.5 s": result["reopen_ms"] < 500,
        "training within 5% of in-memory (separate runs)": result["train_ratio"] >= 0.95,
        "training within 5% of in-memory (interleaved)": result["interleaved_ratio"] >= 0.95,
    }
    for name, ok in checks.items():
        print(f"{'met' if ok else 'NOT MET'}: {name}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
