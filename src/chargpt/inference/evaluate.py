"""Scoring a model on a text: mean per-character cross-entropy over consecutive block_size windows."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.inference import quantize as quant
from chargpt.machine import precision as prec
from chargpt.model import LanguageModel, check_usable


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    tokenizer: CharTokenizer,
    text: str,
    batch_size: int = 32,
    precision: str = "auto",
    progress: Callable[[int], object] | None = None,
    quantize: str = "none",
) -> dict[str, Any]:
    """Loss (nats/char) over non-overlapping windows covering the whole text.

    Window i feeds characters [iT, iT+T) and predicts [iT+1, iT+T+1); every character but the first
    is predicted exactly once, each with the context available inside its window.
    precision: fp32, bf16 (autocast) or auto (bf16 where this machine's batched matmuls are faster in it).
    progress: called after each batch with the number of characters it scored (they add up to `chars`).
    quantize: none, int8 or auto (int8 where this CPU decodes faster with it). With int8 weights the text is
    scored twice, and `loss_unquantized` is the loss of the model as trained, for comparison.
    """
    check_usable(model, tokenizer, "evaluate()")
    if not isinstance(text, str):
        raise TypeError(f"evaluate() takes the text as a str, got {type(text).__name__}")
    return evaluate_ids(model, tokenizer.encode(text), batch_size, precision, progress, quantize)


def evaluate_file(
    model: LanguageModel,
    tokenizer: CharTokenizer,
    path: str | Path,
    *,
    token_cache: str | None = None,
    progress: bool = False,
    batch_size: int = 32,
    precision: str = "auto",
    quantize: str = "none",
) -> dict[str, Any]:
    """evaluate() on a file of any size: its ids stream through the token cache (the model's vocabulary) and
    are read from the memory map a batch at a time. progress: bars on a terminal (tokenizing, scoring)."""
    from chargpt.data.corpus import fixed_policy, token_cache_dir, tokenize_corpus
    from chargpt.data.streaming import progress_bar

    tokens = tokenize_corpus(str(path), fixed_policy(tokenizer), token_cache_dir(token_cache), progress=progress)
    passes = 2 if quant.apply(model, quantize)[1].name == "int8" else 1
    with progress_bar(passes * max(len(tokens.ids) - 1, 0), "evaluating", progress, unit="char") as bar:
        return evaluate_ids(model, tokens.ids, batch_size, precision, bar.update, quantize)


@torch.no_grad()
def evaluate_ids(
    model: LanguageModel,
    ids: np.ndarray | torch.Tensor,
    batch_size: int = 32,
    precision: str = "auto",
    progress: Callable[[int], object] | None = None,
    quantize: str = "none",
) -> dict[str, Any]:
    """evaluate() on token ids (an array, or a view of the memory-mapped token cache: read a batch at a time)."""
    if len(ids) < 2:
        raise ChargptError("the evaluation text needs at least 2 characters")
    run, choice = quant.apply(model, quantize)
    result = _score(run, ids, batch_size, precision, progress)
    result["quantize"] = choice.name
    if choice.name == "int8":
        result["loss_unquantized"] = _score(model, ids, batch_size, precision, progress)["loss"]
    return result


def _score(
    model: LanguageModel,
    ids: np.ndarray | torch.Tensor,
    batch_size: int,
    precision: str,
    progress: Callable[[int], object] | None,
) -> dict[str, Any]:
    from chargpt.data.tokencache import release_pages

    T = model.config.block_size
    n_pred = len(ids) - 1
    n_full = n_pred // T
    device = next(model.parameters()).device
    choice = prec.resolve(precision, device, "eval")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, n_full, batch_size):
            rows = min(batch_size, n_full - i)
            window = _int64(ids[i * T : (i + rows) * T + 1])  # (rows*T + 1,)
            x, y = window[:-1].view(rows, T).to(device), window[1:].view(rows, T).to(device)  # (rows, T) each
            with prec.autocast(device, choice):
                logits, _ = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            if progress is not None:
                progress(rows * T)
            if isinstance(ids, np.ndarray):
                release_pages(ids)
        rest = n_pred - n_full * T
        if rest:
            window = _int64(ids[n_full * T :])  # (rest + 1,)
            x, y = window[:-1][None].to(device), window[1:][None].to(device)  # (1, rest) each
            with prec.autocast(device, choice):
                logits, _ = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            if progress is not None:
                progress(rest)
    finally:
        model.train(was_training)
    loss = total / n_pred
    return {"loss": loss, "bits_per_char": loss / math.log(2), "chars": n_pred, "precision": choice.name}


def _int64(part: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(part, torch.Tensor):
        return part.long()
    return torch.from_numpy(part.astype(np.int64))
