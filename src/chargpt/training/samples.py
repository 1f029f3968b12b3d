"""What the model writes as it learns: at each evaluation a short sample (SAMPLE_CHARS characters, a fixed seed,
a prompt from the data), kept in the evaluation's metrics row and rendered to samples.txt, so a run shows its
text going from noise to the corpus's shape (char-rnn's habit). Rank 0 only; the run's random streams are
untouched (the sample draws from its own generator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chargpt.data.tokenizer import CharTokenizer
from chargpt.fileio import atomic_write_bytes
from chargpt.inference.generate import SampleConfig, generate
from chargpt.storage.layout import SAMPLES
from chargpt.training.report import is_eval

SAMPLE_CHARS = 200
SAMPLE_SEED = 0
SAMPLE_TEMPERATURE = 0.8
PROMPT_CHARS = 40  # the prompt: the corpus's first line, at most this long


def prompt_from(tokenizer: CharTokenizer, ids: Any) -> str:
    """The first line of the training text (its newline included), or its first characters if that line is long
    or holds a character the tokenizer maps to its unknown symbol."""
    head = tokenizer.decode([int(i) for i in ids[:PROMPT_CHARS]])
    line = head[: head.index("\n") + 1] if "\n" in head else head
    return line or "\n"


@torch.no_grad()
def write(model: torch.nn.Module, tokenizer: CharTokenizer, prompt: str) -> str:
    """SAMPLE_CHARS characters after `prompt` from the model as it is now (fp32, full weights, eval mode)."""
    was_training = model.training
    model.eval()
    try:
        config = SampleConfig(
            max_new_tokens=SAMPLE_CHARS, temperature=SAMPLE_TEMPERATURE, seed=SAMPLE_SEED, precision="fp32",
            quantize="none",
        )  # fmt: skip
        return generate(model, tokenizer, prompt, config)[0]  # type: ignore[arg-type]
    except RuntimeError:  # outputs that are not numbers (a model diverging): no sample; the loss says the rest
        return ""
    finally:
        model.train(was_training)


def render(metrics: list[dict[str, Any]]) -> str:
    """samples.txt: each evaluation's sample under its step and val loss, oldest first."""
    parts = []
    for m in metrics:
        if _has_sample(m):
            head = f"=== step {m['step']:,}, val loss {m['val_loss']:.4f} ==="
            parts.append(f"{head}\n{m.get('prompt', '')}{m['sample']}\n")
    return "\n".join(parts)


def save(out: Path, metrics: list[dict[str, Any]]) -> None:
    atomic_write_bytes(out / SAMPLES, render(metrics).encode("utf-8"))


def last(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest evaluation row that holds a sample (for `chargpt info`)."""
    rows = [m for m in metrics if _has_sample(m)]
    return rows[-1] if rows else None


def _has_sample(row: dict[str, Any]) -> bool:
    return is_eval(row) and isinstance(row.get("sample"), str) and row["sample"] != ""
