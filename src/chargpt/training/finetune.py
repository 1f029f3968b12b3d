"""Fine-tuning: a new run whose weights start from a trained model (`--init-from DIR`), on new text.

The shape comes from DIR's model. Its vocabulary is kept, ids and all, and the characters of the new text
that it lacks are appended: their rows of the token embedding and of the head start as a fresh model's
would (the run's seed), so before any step the logits of the old characters are exactly the old model's.
A model with an unknown symbol keeps its vocabulary as it is: new characters map to that symbol. Only the
weights come over: optimizer, step and schedule start afresh.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chargpt.config import TrainConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.storage import checkpoint as ckpt
from chargpt.training import report, sizing

log = logging.getLogger("chargpt.training.finetune")
SHAPE_KEYS = ("arch", "block_size", "n_embd", "n_heads", "n_layers")
LR_FACTOR = 1 / 3  # a fine-tune's default peak learning rate, as a fraction of the preset's
WARMUP = 20  # and its default warm-up steps


@dataclass
class Start:
    """Where a fine-tune starts: the source model's weights, the (extended) vocabulary, and its record."""

    state: dict[str, torch.Tensor]
    tokenizer: CharTokenizer
    old_vocab: int
    added: list[str]
    origin: dict[str, Any]  # written into the new model's config.json: path, step, val loss


def source_shape(init_from: str) -> dict[str, Any]:
    """The shape settings of the model in `init_from` (read cheaply: config.json only)."""
    cfg, _, _ = ckpt.read_config(init_from)
    return {"arch": cfg.arch, "block_size": cfg.block_size, "n_embd": cfg.n_embd, "n_heads": cfg.n_heads,
            "n_layers": cfg.n_layers}  # fmt: skip


def fill_config(values: dict[str, Any], given: dict[str, Any], sources: dict[str, str] | None = None) -> None:
    """Put the source model's shape into `values` (a config being built), refusing a given shape that differs,
    and the fine-tuning defaults (a lower learning rate, a short warm-up) where none was given."""
    init_from = values["init_from"]
    if not isinstance(init_from, str) or not init_from:
        raise ChargptError("--init-from must name a trained model folder")
    if values.get("out") and Path(values["out"]).resolve() == Path(init_from).resolve():
        raise ChargptError(
            "--init-from and --out are the same folder; a fine-tune writes a new one: choose another --out"
        )
    if values.get("vocab", "auto") != "auto":
        raise ChargptError(
            "--vocab cannot be combined with --init-from: the vocabulary is the model's, extended by the new "
            "text's characters; drop --vocab"
        )
    shape = source_shape(init_from)
    for key, value in shape.items():
        if key in given and given[key] != value:
            where = (sources or {}).get(key, "--" + key.replace("_", "-"))
            raise ChargptError(
                f"{where} sets {key} = {given[key]!r} but the model in {init_from} has {value!r}; a fine-tune keeps "
                f"the model's shape: drop it"
            )
        values[key] = value
    if "learning_rate" not in given:
        values["learning_rate"] = values["learning_rate"] * LR_FACTOR
    if "warmup_updates" not in given:
        values["warmup_updates"] = WARMUP
    if values.get("max_time") and not {"eval_interval", "eval_iters"} & set(given):
        values.update(evaluations_for_budget(init_from, values))


def evaluations_for_budget(init_from: str, values: dict[str, Any]) -> dict[str, int]:
    """A fine-tune with a time budget gets its evaluations spaced as a sized run's (a learning curve of about a
    dozen points), its step count estimated from the source run's speed; {} when its record says none."""
    speed = source_speed(Path(init_from))
    if speed is None:
        return {}
    steps = values["max_time"] * speed / (values["batch_size"] * values["block_size"])
    return sizing.evaluation(steps, splits=3 if values.get("ema") else 2)


def source_speed(folder: Path) -> float | None:
    """The training tokens/s the source run measured (metrics.jsonl), or else its steps over its seconds."""
    rows = [] if (folder / report.METRICS).is_symlink() else report.read_metrics(folder, 10**18)
    measured = [m.get("tokens_per_s") for m in rows]
    measured = [s for s in measured if isinstance(s, (int, float)) and 0 < s < math.inf]
    if measured:
        return float(measured[-1])
    trained = ckpt.read_config(folder)[2].get("train_config") or {}
    tokens = (trained.get("batch_size") or 0) * (trained.get("block_size") or 0)
    timed = [m for m in rows if isinstance(m.get("time"), (int, float)) and m["time"] > 0 and m.get("step")]
    if not timed or not isinstance(tokens, int) or tokens <= 0:
        return None
    return timed[-1]["step"] * tokens / timed[-1]["time"]


def start(cfg: TrainConfig) -> Start:
    """Load the source model; the vocabulary for the new text (the source's, extended when it has no unknown
    symbol) is settled by `extend` once the new text's characters are known."""
    model, tokenizer = ckpt.load_model(cfg.init_from)
    _, _, info = ckpt.read_config(cfg.init_from)
    origin = {"path": str(Path(cfg.init_from).resolve()), "step": info.get("step"), "val_loss": info.get("val_loss")}
    state = {k: v.detach().clone() for k, v in ckpt.plain_state_dict(model).items()}
    return Start(state, tokenizer, tokenizer.vocab_size, [], origin)


LARGE_ADDITION = 50  # more new characters than this: most are rare, and --min-char-count is worth a word
RARE_HINT = (
    " (most of so many are rare: --min-char-count N maps the characters seen fewer than N times to one unknown "
    "symbol, so the model spends nothing on them)"
)


def extend(begin: Start, new_chars: list[str]) -> None:
    """Append the new text's characters the source vocabulary lacks (none if it has an unknown symbol)."""
    if begin.tokenizer.unknown is not None:
        return
    known = set(begin.tokenizer.chars)
    begin.added = [c for c in new_chars if c not in known]
    if begin.added:
        begin.tokenizer = CharTokenizer(begin.tokenizer.chars + begin.added)
        shown = ", ".join(repr(c) for c in begin.added[:8]) + (" ..." if len(begin.added) > 8 else "")
        log.info("the new text has %d character(s) the model lacks, added to its vocabulary: %s%s",
                 len(begin.added), shown, RARE_HINT if len(begin.added) > LARGE_ADDITION else "")  # fmt: skip


def load_into(model: torch.nn.Module, begin: Start) -> None:
    """Copy the source weights into the new model (built with the run's seed): every tensor whole, except where
    the vocabulary grew (the embedding's and head's rows, a bigram table's rows and columns): the new
    characters' entries keep their fresh initialisation."""
    target = ckpt.plain_state_dict(model)
    with torch.no_grad():
        for name, tensor in target.items():
            source = begin.state[name]
            tensor[tuple(slice(0, n) for n in source.shape)].copy_(source)
