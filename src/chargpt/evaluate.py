"""Scoring a model on a text: mean per-character cross-entropy over consecutive block_size windows."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from chargpt import precision as prec
from chargpt.errors import ChargptError
from chargpt.model import GPT, BigramLM
from chargpt.tokenizer import CharTokenizer


@torch.no_grad()
def evaluate(
    model: GPT | BigramLM,
    tokenizer: CharTokenizer,
    text: str,
    batch_size: int = 32,
    precision: str = "auto",
    progress: Callable[[int], object] | None = None,
) -> dict[str, float]:
    """Loss (nats/char) over non-overlapping windows covering the whole text.

    precision: fp32, bf16 (autocast) or auto (bf16 where this machine's batched matmuls are faster in it).
    Window i feeds characters [iT, iT+T) and predicts [iT+1, iT+T+1); every character but the first
    is predicted exactly once, each with the context available inside its window.
    progress: called after each batch with the number of characters it scored (they add up to `chars`).
    """
    ids = torch.as_tensor(tokenizer.encode(text))
    if len(ids) < 2:
        raise ChargptError("the evaluation text needs at least 2 characters")
    T = model.config.block_size
    n_pred = len(ids) - 1
    n_full = n_pred // T
    device = next(model.parameters()).device
    choice = prec.resolve(precision, device, "eval")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        full_x = ids[: n_full * T].view(n_full, T)
        full_y = ids[1 : n_full * T + 1].view(n_full, T)
        for i in range(0, n_full, batch_size):
            x, y = full_x[i : i + batch_size].to(device), full_y[i : i + batch_size].to(device)
            with prec.autocast(device, choice):
                logits, _ = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            if progress:
                progress(y.numel())
        rest = n_pred - n_full * T
        if rest:
            x = ids[n_full * T : n_full * T + rest][None].to(device)
            y = ids[n_full * T + 1 :][None].to(device)
            with prec.autocast(device, choice):
                logits, _ = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            if progress:
                progress(rest)
    finally:
        model.train(was_training)
    loss = total / n_pred
    return {"loss": loss, "bits_per_char": loss / math.log(2), "chars": n_pred}
