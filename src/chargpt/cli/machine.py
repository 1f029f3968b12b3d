"""`chargpt info --machine`: what chargpt decides on this machine and why, in one place (for users, bug reports and
the test suite's first lines): the CPU and its speed flags, free cores and the threads each command would take,
the number formats auto picks per kind of work, int8 decoding, whether the server's batched step is exact here,
and where the caches live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from chargpt.machine import cores
from chargpt.machine import precision as prec

# the widths the checks below use: the 10.8M seed model's (a 1-layer slice where only its widths matter)
SEED = dict(vocab_size=65, block_size=256, n_embd=384, n_heads=6, dropout=0.0)


def describe(measure: bool = True) -> dict[str, Any]:
    """The report as plain data. measure=False leaves out what needs timing (precision and int8 choices, ~2 s,
    cached afterwards) and reports only what the machine is and the batching check."""
    info = prec.cpu_info()
    total, free = cores.cores(), cores.free_cores()
    threads = _threads(total, free)
    report: dict[str, Any] = {
        "cpu": {
            "model": info.model,
            "speed_flags": [f for f in prec.SPEED_FLAGS if f in info.flags],
            "torch_kernels": info.capability,
            "torch": torch.__version__,
            "mkl": torch.backends.mkl.is_available(),
            "mkl_cbwr": mkl_cbwr(),
            "native_bf16": bool(info.native_bf16),
        },
        "cores": {"total": total, "free_now": free},
        "threads": threads,
        "serve_batching": _batching(threads["serve"]),
        "caches": _caches(),
    }
    if measure:
        report["precision"] = {kind: _choice(prec.resolve("auto", "cpu", kind)) for kind in ("prefill", "decode")}
        report["precision"]["train_eval"] = (
            "measured on each run's own model at its start (cached per shape)" if info.native_bf16 else "fp32"
        )
        report["int8"] = _int8()
    return report


def lines(report: dict[str, Any]) -> list[str]:
    """The report as text, one fact a line."""
    cpu, c, t = report["cpu"], report["cores"], report["threads"]
    out = [
        f"cpu: {cpu['model']}; speed flags: {' '.join(cpu['speed_flags']) or 'none of ' + ' '.join(prec.SPEED_FLAGS)}",
        f"torch {cpu['torch']}, {cpu['torch_kernels']} kernels, MKL {'yes' if cpu['mkl'] else 'no'}, native bf16 "
        f"{'yes' if cpu['native_bf16'] else 'no'}; MKL_CBWR {cpu['mkl_cbwr']}",
        f"cores: {c['total']}, free now {c['free_now']}; threads: train {t['train']}, sample {t['sample']} (one "
        f"stream), serve {t['serve']} (one core left to HTTP)",
        f"serve: {report['serve_batching']}",
    ]
    if "precision" in report:
        p = report["precision"]
        out.append(f"precision (auto): sampling prefill {p['prefill']}; one-token decode {p['decode']}")
        out.append(f"precision (auto): training and evaluation {p['train_eval']}")
        out.append(f"int8 decoding (auto, the 10.8M seed shape): {report['int8']}")
    caches = report["caches"]
    out.append(f"caches: {caches['folder']} (token cache {caches['tokens']}; {caches['measurements']} measurements)")
    return out


def mkl_cbwr() -> str:
    """MKL's reproducibility mode and who chose it (chargpt sets AUTO unless the environment named one); the
    benchmarks print it beside the CPU flags."""
    import chargpt

    value = os.environ.get("MKL_CBWR", "")
    return f"{value or 'off'} ({'from the environment' if chargpt.MKL_CBWR_FROM_USER else 'set by chargpt'})"


def _threads(total: int, free: int) -> dict[str, int]:
    from chargpt.inference.generate import decode_threads

    train = cores.choose_threads(None, total, free)
    return {"train": train, "sample": decode_threads(1), "serve": max(1, train - 1)}


def _choice(choice: Any) -> str:
    return f"{choice.name} ({choice.reason})"


def _batching(threads: int) -> str:
    """The server's batching decision at its thread count, on a model of the seed's widths."""
    from chargpt.config import GPTConfig
    from chargpt.inference.decode import batch_invariant
    from chargpt.model import GPT
    from chargpt.serve.engine import batching_mode

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GPT(GPTConfig(n_layers=1, **SEED)).eval()  # type: ignore[arg-type]
        return batching_mode(lambda per_row: batch_invariant(model, per_row=per_row))[1]
    finally:
        torch.set_num_threads(before)


def _int8() -> str:
    from chargpt.config import GPTConfig
    from chargpt.inference import quantize
    from chargpt.model import GPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layers=6, **SEED)).eval()  # type: ignore[arg-type]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as sampling one stream runs
    try:
        return _choice(quantize.resolve("auto", "cpu", model))
    finally:
        torch.set_num_threads(before)


def _caches() -> dict[str, Any]:
    from chargpt.data.corpus import token_cache_dir
    from chargpt.fileio import cache_dir

    folder = cache_dir()
    measured = list(folder.glob("precision-*.json")) if folder.is_dir() else []
    return {"folder": str(folder), "tokens": str(token_cache_dir(None) or Path("off")), "measurements": len(measured)}
