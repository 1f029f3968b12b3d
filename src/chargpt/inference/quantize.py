"""Weight-only int8: each Linear's weight as int8 with one scale per output channel, for sampling and serving.

Decoding one token streams every weight from memory once, so the fp32 step cannot go below the time of
reading 4 bytes per weight; int8 reads one. The product runs in torch's `_weight_int8pack_mm` (activations
in bf16, each output row scaled by its bf16 scale). `auto` uses int8 on any CPU where this model's one-token
step, timed with both (cached per machine and shape), is faster with int8, with native bf16 or without, and
never on other devices. Embeddings and LayerNorms stay fp32.

`quantized(model)` returns a copy of the GPT whose Linear layers are `Int8Linear`: the forward (prefill,
evaluation) and the one-token step (chargpt.inference.decode) both run on it. The copy is kept per model and rebuilt
when the model's weights change.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from chargpt.config import QUANTIZE, check_name
from chargpt.errors import ChargptError
from chargpt.inference.decode import DecodeStep
from chargpt.inference.int8 import Int8Linear
from chargpt.machine import precision as prec
from chargpt.model import GPT

CACHE_VERSION = 2  # 2: the model's step, per shape (1: one product)


_copies: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module]] = weakref.WeakKeyDictionary()


def quantized(model: nn.Module) -> nn.Module:
    """A copy of the GPT with int8 Linear layers (kept, and rebuilt when the model's weights change)."""
    if not isinstance(model, GPT):
        raise ChargptError("int8 weights are for the GPT (the bigram model has no Linear layers)")
    if next(model.parameters()).device.type != "cpu":
        raise ChargptError("int8 decoding runs on the CPU; use --quantize none on other devices")
    versions = tuple(p._version for p in model.parameters()) + tuple(id(p) for p in model.parameters())
    kept = _copies.get(model)
    if kept is not None and kept[0] == versions:
        return kept[1]
    q = copy.deepcopy(model).eval()
    for parent in list(q.modules()):  # every Linear layer, wherever the model keeps it
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    for p in q.parameters():
        p.requires_grad_(False)
    _copies[model] = (versions, q)
    return q


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


@dataclass(frozen=True)
class Choice:
    """int8 or none, and why (shown to the user)."""

    name: str
    reason: str


def check(name: str) -> str:
    return check_name("quantization", name, QUANTIZE)


def resolve(
    name: str, device: torch.device | str, model: nn.Module, cache: Path | None = None, info: prec.CPUInfo | None = None
) -> Choice:
    """int8 as asked, none as asked, or (auto) int8 only where this model's one-token step is measured faster
    with int8 weights than with fp32 on this CPU (info: the CPU, for tests; default this one)."""
    check(name)
    device = torch.device(device)
    if name == "none":
        return Choice("none", "asked for with --quantize none")
    if name == "int8":
        if device.type != "cpu":
            raise ChargptError(f"int8 decoding runs on the CPU, not {device.type}; use --quantize none")
        return Choice("int8", "asked for with --quantize int8")
    if device.type != "cpu":
        return Choice("none", f"int8 decoding is for the CPU, not {device.type}")
    return choose(measured_speedup(info or prec.cpu_info(), model, cache))


def choose(speedup: float) -> Choice:
    """Auto's rule, given int8's measured speed over fp32 on this CPU."""
    if speedup >= prec.MIN_SPEEDUP:
        return Choice("int8", f"this model's one-token step measured {speedup:.1f}x as fast with int8 weights")
    return Choice("none", f"this model's one-token step measured only {speedup:.2f}x as fast with int8 weights")


def measured_speedup(info: prec.CPUInfo, model: nn.Module, directory: Path | None = None) -> float:
    """fp32 time / int8 time of the model's one-token step, cached for this machine (CPU, flags, torch,
    threads) and the model's shape."""
    cfg = model.config
    shape = (cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_heads, cfg.n_layers)
    path = prec.keyed_cache_file(info, f"int8|{CACHE_VERSION}|{shape}", directory)
    saved = prec.cached(path, ("int8",), lambda: {"int8": measure_speedup(model), "cpu": info.model})
    return float(saved["int8"])


def measure_speedup(model: nn.Module, budget_s: float = 0.3) -> float:
    """The model's one-token step (chargpt.inference.decode) at mid-window, fp32 weights against int8; best of
    each, alternating. The real step, not one product: whether int8 pays depends on whether the fp32 weights
    fit in this CPU's caches and on what the step does besides its products (measured on an Intel Xeon with
    AMX: a single 384 x 1536 product 1.0x, the 10.8M seed model's step 1.8x)."""
    runs = []
    for m in (model, quantized(model)):
        step = DecodeStep(m)  # type: ignore[arg-type]
        runs.append((step, step.cache(1)))
    token, at = torch.zeros(1, dtype=torch.long, device=model.head.weight.device), model.config.block_size // 2
    with torch.inference_mode():
        return prec.alternate(*(lambda s=s, c=c: s(token, c, at) for s, c in runs), budget_s)


def apply(model: nn.Module, name: str, device: torch.device | str | None = None) -> tuple[nn.Module, Choice]:
    """The model to run for quantization `name` (auto, none, int8), and the choice with its reason."""
    check(name)
    if not isinstance(model, GPT):
        if name == "int8":
            raise ChargptError("int8 weights are for the GPT (the bigram model has no Linear layers)")
        return model, Choice("none", "the bigram model has no Linear layers")
    choice = resolve(name, next(model.parameters()).device if device is None else device, model)
    if choice.name != "int8":
        _copies.pop(model, None)  # the copy auto timed (11 MB for the seed model) is not kept for nothing
    return (quantized(model) if choice.name == "int8" else model), choice


def decode_format(model: nn.Module, decode: prec.Choice) -> prec.Choice:
    """The number format of the one-token step for this model: with int8 weights fp32 around them (the int8
    kernel takes bf16 activations itself; autocast would only add casts to the LayerNorms and attention)."""
    if is_quantized(model) and decode.name != "fp32":
        return prec.Choice("fp32", "int8 weights: their kernel takes bf16 activations itself")
    return decode
