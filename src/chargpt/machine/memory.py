"""How much memory a configuration needs, checked before anything is allocated.

An absurd size (`--batch-size 100000000`, `--n-embd 100000000`) would otherwise end in the kernel's OOM
killer (no message) or an allocation traceback. The estimates count only what certainly has to exist
(weights, gradients, AdamW's two moments, a few activations per layer, the logits), so they stay below
the real peak: they never refuse a configuration that fits, and refuse the ones that cannot.
"""

from __future__ import annotations

import os
import resource

import torch

from chargpt.config import GPTConfig
from chargpt.errors import ChargptError

FLOAT = 4  # bytes: weights, gradients and optimizer state are float32


def n_params(cfg: GPTConfig) -> int:
    """Parameters of the model `cfg` describes (to within the small bias and norm vectors)."""
    if cfg.arch == "bigram":
        return cfg.vocab_size * cfg.vocab_size
    C, L = cfg.n_embd, cfg.n_layers
    return L * 12 * C * C + 2 * cfg.vocab_size * C + cfg.block_size * C


def training_bytes(cfg: GPTConfig, rows: int) -> int:
    """Weights + gradients + AdamW state, and the activations of `rows` sequences of block_size tokens."""
    tokens = rows * cfg.block_size
    if cfg.arch == "bigram":
        activations = tokens * cfg.vocab_size * FLOAT * 2
    else:  # (B, T, C) per layer: at least the residual, attention output and MLP input are kept
        activations = tokens * (cfg.n_layers * 3 * cfg.n_embd + 2 * cfg.vocab_size) * FLOAT
    return 4 * n_params(cfg) * FLOAT + activations


def inference_bytes(cfg: GPTConfig, rows: int) -> int:
    """Weights, the KV cache of `rows` sequences and one layer's activations."""
    tokens = rows * cfg.block_size
    kv = 0 if cfg.arch == "bigram" else tokens * cfg.n_layers * 2 * cfg.n_embd * FLOAT
    return n_params(cfg) * FLOAT + kv + tokens * cfg.vocab_size * FLOAT


def available(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device` (None: unknown, e.g. mps)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = _meminfo("/proc/meminfo", "MemAvailable:")
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:  # a ulimit -v (or a test's setrlimit) caps this process's address space
        used = _meminfo("/proc/self/status", "VmSize:") or 0
        free = min(free, max(limit - used, 0))
    return free


def check(needed: int, device: torch.device, what: str, fix: str) -> None:
    """Refuse, with the estimate and the machine's memory, a `what` that cannot fit."""
    have = available(device)
    if have is not None and needed > have:
        where = "free GPU memory" if device.type == "cuda" else "memory available"
        raise ChargptError(f"{what} needs at least {_gib(needed)} but this machine has {_gib(have)} {where}; {fix}")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):,.1f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):,.0f} MiB"


def _meminfo(path: str, key: str) -> int | None:
    """A `Key:  N kB` line of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
