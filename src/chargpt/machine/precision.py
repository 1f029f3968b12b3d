"""Which number format each kind of work runs in: fp32, or bf16 autocast where this machine is faster with it.

Weights, gradients and optimizer state always stay fp32; bf16 is only ever autocast (or a cast for
inference), so checkpoints and exact resume do not depend on the choice. `auto` decides per device and
per kind of work, because the answer differs: batched matmuls (training, evaluation, prefill) and
one-token matrix-vector products (decoding) run on different kernels.

- CUDA: bf16 for batched work where the GPU supports it (as training always did); fp32 for decoding,
  which is launch-bound at batch 1, so bf16 would only add cast kernels.
- CPU: bf16 only where the CPU has native bf16 instructions (avx512_bf16, amx_bf16, or Arm's bf16)
  and a measurement confirms that bf16 is faster for that kind of work. Where the caller can run the
  real work (training: a step of the actual model on a batch of the actual shape; evaluation: a forward
  pass), a `Probe` times that, alternating the two formats (a few seconds at most, less in a short run; cached
  per machine, shape, thread count and torch version, and measured again for a run that may time it longer
  than the cached measurement was): at small widths the casts autocast adds can cost more than
  the bf16 matmuls save. Otherwise a micro-benchmark of the two shapes that matter (< 100 ms, cached per
  machine) decides. Without native bf16, torch emulates it ~80x slower than fp32, so nothing is
  measured and fp32 is chosen.
- anything else (MPS): fp32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chargpt.config import PRECISIONS, check_name
from chargpt.errors import ChargptError
from chargpt.fileio import atomic_write_bytes, cache_dir

KINDS = ("train", "eval", "prefill", "decode")  # the first three are batched matmuls; decode is one token
BATCHED = ("train", "eval", "prefill")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16)
# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) below its first with bf16 instructions (avx512_core_bf16)
ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
# the flags reports show (info --machine, the benchmarks): AVX2 and AVX-512 kernels, int8 dot products, bf16
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")
MIN_SPEEDUP = 1.1  # bf16 must beat fp32 by this much to be chosen: below it, rounding is not worth it
CACHE_VERSION = 1


@dataclass(frozen=True)
class Choice:
    """The number format of one kind of work, and why it was chosen (shown to the user)."""

    name: str  # "fp32" or "bf16"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32


FP32 = Choice("fp32", "the default")


@dataclass(frozen=True)
class CPUInfo:
    model: str
    flags: frozenset[str]
    capability: str  # torch's CPU kernel level, e.g. "AVX2", "AVX512"
    held: bool = False  # the kernels are held below the CPU's bf16 instructions (see cpu_info)

    @property
    def native_bf16(self) -> list[str]:
        """The CPU's bf16 instructions that torch's kernels may use (none where they are held below them)."""
        return [] if self.held else [f for f in NATIVE_BF16_FLAGS if f in self.flags]


@dataclass(frozen=True)
class Speedups:
    """bf16 speed over fp32 (> 1: bf16 is faster), measured on this machine."""

    matmul: float  # a training-shaped (rows x C) @ (C x 4C) product
    matvec: float  # the one-token decode shape: (1 x C) @ (C x 4C)


def cpu_info() -> CPUInfo:
    """This CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere none are known)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 says flags, Arm says Features
            flags = frozenset(value.split())
    capability = _torch_capability()
    return CPUInfo(model, flags, capability, _held(flags, capability))


def _held(flags: frozenset[str], capability: str) -> bool:
    """Whether torch's kernels are held below this x86 CPU's bf16 instructions (ATEN_CPU_CAPABILITY=avx2,
    ONEDNN_MAX_CPU_ISA=AVX2: how an AVX2-only CPU is reproduced on a larger one): bf16 would then be emulated, so
    the CPU counts as one without it, as a real AVX2 CPU is."""
    if not any(f in flags for f in ("avx512_bf16", "amx_bf16")):
        return False
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return capability in ("AVX2", "DEFAULT") or isa in ISAS_WITHOUT_BF16


def _torch_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def check(name: str) -> str:
    return check_name("precision", name, PRECISIONS)


@dataclass(frozen=True)
class Probe:
    """The real work of one kind, runnable in either format: `run(choice)` does one unit of it (e.g. one
    training step's forward and backward) under that choice's autocast. `key` names its shape (the cache key)."""

    key: str
    run: Callable[[Choice], object]
    budget_s: float = 2.5  # both formats together, warm-ups excluded (at least one round of each is timed)


def resolve(
    name: str, device: torch.device | str, kind: str, cache: Path | None = None, probe: Probe | None = None
) -> Choice:
    """The format for `kind` of work on `device`, as asked (`fp32`, `bf16`) or chosen (`auto`; with a probe,
    by timing that real work on a CPU with native bf16)."""
    check(name)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    device = torch.device(device)
    if name == "fp32":
        return Choice("fp32", "asked for with --precision fp32")
    if name == "bf16":
        return Choice("bf16", "asked for with --precision bf16" + _bf16_caveat(device))
    if device.type == "cuda":
        return _cuda_auto(device, kind)
    if device.type != "cpu":
        return Choice("fp32", f"bf16 autocast is not used on {device.type}")
    info = cpu_info()
    if not info.native_bf16:
        return Choice("fp32", f"this CPU has no native bf16: no {'/'.join(NATIVE_BF16_FLAGS[:2])} flag")
    if probe is not None:
        return choose_measured(kind, info, measured_probe(info, probe, cache))
    return choose_cpu(kind, info, measured_speedups(info, cache))


def choose_measured(kind: str, info: CPUInfo, ratio: float) -> Choice:
    """Auto's CPU rule when the real work was timed: bf16 only if it ran that work MIN_SPEEDUP x as fast."""
    flags = "/".join(info.native_bf16)
    what = {"train": "a training step", "eval": "an evaluation batch"}.get(kind, f"the {kind} work")
    if ratio >= MIN_SPEEDUP:
        return Choice("bf16", f"CPU has {flags}; {what} of this model measured {ratio:.2f}x as fast in bf16")
    return Choice("fp32", f"CPU has {flags} but {what} of this model measured only {ratio:.2f}x as fast in bf16")


def choose_cpu(kind: str, info: CPUInfo, speed: Speedups | None) -> Choice:
    """Auto's CPU rule, given the CPU's flags and (where it has native bf16) the measured speedups."""
    if not info.native_bf16 or speed is None:
        return Choice("fp32", f"this CPU has no native bf16: no {'/'.join(NATIVE_BF16_FLAGS[:2])} flag")
    what, ratio = ("matrix-vector", speed.matvec) if kind == "decode" else ("matmul", speed.matmul)
    flags = "/".join(info.native_bf16)
    if ratio >= MIN_SPEEDUP:
        return Choice("bf16", f"CPU has {flags}; bf16 {what} measured {ratio:.1f}x as fast as fp32")
    return Choice("fp32", f"CPU has {flags} but bf16 {what} measured only {ratio:.2f}x the speed of fp32")


def _cuda_auto(device: torch.device, kind: str) -> Choice:
    if kind == "decode":
        return Choice("fp32", "one-token decoding on a GPU is launch-bound: bf16 would only add casts")
    if torch.cuda.is_bf16_supported():
        return Choice("bf16", "this GPU supports bf16 autocast")
    return Choice("fp32", "this GPU has no bf16 support")


def _bf16_caveat(device: torch.device) -> str:
    if device.type == "cpu" and not cpu_info().native_bf16:
        return "; this CPU has no native bf16, expect it to be much slower than fp32"
    return ""


def autocast(device: torch.device | str, choice: Choice, cache_enabled: bool = True) -> AbstractContextManager:
    """The context to run a kind of work in: bf16 autocast on, or (fp32) off, also inside an enclosing one.
    fp32 with no enclosing region is no region at all (entering one costs as much as a few one-token operations)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda") or (choice.name == "fp32" and not torch.is_autocast_enabled(device.type)):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=choice.name == "bf16", cache_enabled=cache_enabled)


def weight_cast_region(device: torch.device | str, *choices: Choice) -> AbstractContextManager:
    """Wrap a whole generation (or a server's decoding thread) in this: autocast forgets its bf16 copies of the
    weights whenever the outermost autocast region ends, so without an enclosing (disabled) region every
    token would cast every weight again. A no-op unless one of the choices is bf16."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda") or all(c.name != "bf16" for c in choices):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=False)


def describe(choices: dict[str, Choice]) -> str:
    """One phrase for the run's announcement, e.g. 'fp32 (this CPU has no native bf16 ...)'."""
    names = {c.name for c in choices.values()}
    if len(names) == 1:
        first = next(iter(choices.values()))
        return f"{first.name} ({first.reason})"
    return "; ".join(f"{kind} {c.name} ({c.reason})" for kind, c in choices.items())


# ---------------------------------------------------------------------------------------------
# the micro-benchmark and its per-machine cache


# the environment variables that change which kernels MKL and oneDNN run, or how they round: a measurement taken
# under one set of them says nothing of another (AVX2 kernels on an AVX-512 CPU, say)
KERNEL_SETTINGS = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cache_file(info: CPUInfo, directory: Path | None = None) -> Path:
    """Where this machine's measurement lives: keyed by CPU model, flags, torch version, thread count and the
    environment variables that choose MKL's and oneDNN's kernels (`KERNEL_SETTINGS`; torch's own is `capability`)."""
    if directory is None:
        directory = cache_dir()
    key = "|".join(
        [str(CACHE_VERSION), info.model, " ".join(sorted(info.flags)), info.capability, torch.__version__]
        + [str(torch.get_num_threads())]
        + [f"{name}={os.environ[name]}" for name in KERNEL_SETTINGS if name in os.environ]
    )
    return directory / f"precision-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def measured_speedups(info: CPUInfo, directory: Path | None = None) -> Speedups:
    """The cached measurement for this machine, or a fresh one (then cached; an unwritable cache is fine)."""
    saved = cached(cache_file(info, directory), ("matmul", "matvec"), lambda: {**asdict(measure_speedups()),
                                                                                 "cpu": info.model})  # fmt: skip
    return Speedups(matmul=float(saved["matmul"]), matvec=float(saved["matvec"]))


def keyed_cache_file(info: CPUInfo, key: str, directory: Path | None = None) -> Path:
    """Where a measurement of one kind of work (`key`: what was timed, its shape) lives, beside this machine's."""
    base = cache_file(info, directory)
    return base.with_name(f"{base.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def measured_probe(info: CPUInfo, probe: Probe, directory: Path | None = None) -> float:
    """bf16's speed over fp32 on the probe's work: cached for this machine and shape where it was timed for at
    least the probe's budget (a short run's quick measurement does not decide a long run's format), else timed
    (then cached)."""
    path = keyed_cache_file(info, probe.key, directory)

    def measure() -> dict:
        return {"ratio": time_probe(probe), "budget_s": probe.budget_s, "key": probe.key, "cpu": info.model}

    def long_enough(saved: dict) -> bool:
        timed = saved.get("budget_s", Probe.budget_s)  # entries from before budgets were recorded: the default's
        return _ratio(timed) and timed >= probe.budget_s

    return float(cached(path, ("ratio",), measure, long_enough)["ratio"])


def cached(
    path: Path, keys: tuple[str, ...], measure: Callable[[], dict], usable: Callable[[dict], bool] = lambda _: True
) -> dict:
    """The measurement saved at `path` if it holds a finite positive number for each of `keys` (a ratio of two
    times: never NaN, infinite, zero, negative or a boolean) and is `usable`, else a fresh one, saved there (an
    unwritable, damaged or tampered cache only costs a measurement)."""
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and all(_ratio(saved.get(k)) for k in keys) and usable(saved):
            return saved
    except (OSError, ValueError, RecursionError):
        pass
    fresh = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(fresh).encode())
    except (OSError, ChargptError):
        pass  # measured again next time
    return fresh


def _ratio(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def time_probe(probe: Probe) -> float:
    """fp32 time / bf16 time of one unit of the probe's work (see `alternate`)."""
    fp32, bf16 = Choice("fp32", "probe"), Choice("bf16", "probe")
    return alternate(lambda: probe.run(fp32), lambda: probe.run(bf16), probe.budget_s)


def alternate(first: Callable[[], object], second: Callable[[], object], budget_s: float, rounds: int = 50) -> float:
    """first's time / second's: one warm-up each, then the two alternate (so a machine whose speed drifts slows
    both alike) until the budget is spent or `rounds` are done; the best time of each counts."""
    first(), second()
    best = [float("inf"), float("inf")]
    spent, done = 0.0, 0
    while done < 1 or (spent < budget_s and done < rounds):
        for i, fn in enumerate((first, second)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best[i], spent = min(best[i], dt), spent + dt
        done += 1
    return round(best[0] / best[1], 3)


def measure_speedups(n_embd: int = 384, rows: int = 128, budget_s: float = 0.012) -> Speedups:
    """bf16 vs fp32 speed of the two shapes that matter; about 4 x budget_s of work (~50 ms by default)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_embd, 4 * n_embd, generator=g)  # (C, 4C): a feed-forward weight
    x = torch.randn(rows, n_embd, generator=g)  # (rows, C): a batch of positions
    v = torch.randn(1, n_embd, generator=g)  # (1, C): one token
    wb, xb, vb = w.bfloat16(), x.bfloat16(), v.bfloat16()
    with torch.inference_mode():
        matmul = _seconds(lambda: x @ w, budget_s) / _seconds(lambda: xb @ wb, budget_s)
        matvec = _seconds(lambda: v @ w, budget_s) / _seconds(lambda: vb @ wb, budget_s)
    return Speedups(matmul=round(matmul, 3), matvec=round(matvec, 3))


def _seconds(fn, budget_s: float) -> float:
    """Best time of one call, repeating within about budget_s (the first call is a warm-up)."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(1000):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent >= budget_s:
            break
    return best
