"""Scoring a model on a text: mean per-character cross-entropy over consecutive block_size windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chargpt.data.corpus import fixed_policy, token_cache_dir, tokenize_corpus
from chargpt.data.streaming import progress_bar
from chargpt.data.tokencache import release_pages
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.inference import quantize as quant
from chargpt.inference.generate import top_logprobs
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


def _windows(ids: np.ndarray | torch.Tensor, T: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The scoring windows of a text: (inputs, targets), (rows, T) each, up to batch_size rows at a time, then the
    rest as one shorter row. Window i feeds [iT, iT+T) and predicts [iT+1, iT+T+1)."""
    n_pred = len(ids) - 1
    n_full = n_pred // T
    for i in range(0, n_full, batch_size):
        rows = min(batch_size, n_full - i)
        window = _int64(ids[i * T : (i + rows) * T + 1])  # (rows*T + 1,)
        yield window[:-1].view(rows, T), window[1:].view(rows, T)
    if n_pred - n_full * T:
        window = _int64(ids[n_full * T :])  # (rest + 1,)
        yield window[:-1][None], window[1:][None]


def _score(
    model: LanguageModel,
    ids: np.ndarray | torch.Tensor,
    batch_size: int,
    precision: str,
    progress: Callable[[int], object] | None,
) -> dict[str, Any]:
    n_pred = len(ids) - 1
    device = next(model.parameters()).device
    choice = prec.resolve(precision, device, "eval")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for x, y in _windows(ids, model.config.block_size, batch_size):
            with prec.autocast(device, choice):
                logits, _ = model(x.to(device))
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").item()
            if progress is not None:
                progress(y.numel())
            if isinstance(ids, np.ndarray):
                release_pages(ids)
    finally:
        model.train(was_training)
    loss = total / n_pred
    return {"loss": loss, "bits_per_char": loss / math.log(2), "chars": n_pred, "precision": choice.name}


@torch.inference_mode()
def token_logprobs(
    model: LanguageModel, ids: Sequence[int], top: int, choice: prec.Choice = prec.FP32, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each character's log-probability given the ones before it, scored in evaluate()'s windows (so that
    their sum is -loss x characters of evaluate() on the same text), in the number format `choice`.
    ids: n >= 2 token ids. Returns the log-probabilities of characters 1..n-1 (n-1,) and the `top` likeliest
    characters' ids and log-probabilities at each of those places (n-1, top) each. The model is in eval mode."""
    device = next(model.parameters()).device
    parts = []
    for x, y in _windows(torch.as_tensor(ids, dtype=torch.long), model.config.block_size, batch_size):
        with prec.autocast(device, choice):
            logits, _ = model(x.to(device))
        parts.append(top_logprobs(logits.flatten(0, 1), y.to(device).flatten(), top))
    picked, best_ids, best = (torch.cat(p).cpu() for p in zip(*parts, strict=True))
    return picked, best_ids, best


def _int64(part: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(part, torch.Tensor):
        return part.long()
    return torch.from_numpy(part.astype(np.int64))
