"""chargpt: a character-level GPT you can train on a laptop CPU, sample fast, and scale out with torchrun."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# MKL's conditional numerical reproducibility, on unless the user set it: without it MKL on AMD CPUs rounds a
# product by where its operands lie in memory and by the thread count, so attention and the one-row products of
# the server's batched step differ from a row's own step; with it they do not, at no measured cost (see
# docs/benchmarks.md). MKL reads it at its first call, so this comes before chargpt runs anything in torch.
MKL_CBWR_FROM_USER = "MKL_CBWR" in os.environ
os.environ.setdefault("MKL_CBWR", "AUTO")

if TYPE_CHECKING:
    from chargpt.config import GPTConfig, TrainConfig
    from chargpt.data.corpus import load_corpus, shakespeare_text
    from chargpt.data.tokenizer import CharTokenizer
    from chargpt.errors import ChargptError
    from chargpt.inference.evaluate import evaluate
    from chargpt.inference.generate import SampleConfig, generate, stream
    from chargpt.model import GPT, BigramLM, build_model
    from chargpt.storage.checkpoint import load_model, save_model
    from chargpt.training.loop import TrainResult, train
    from chargpt.training.settings import make_train_config, resume_config

# Imported on first use: `chargpt --help` and the CLI's start-up do not wait for torch (and a Ctrl-C in
# that first half second reaches the CLI's handler instead of an import's traceback).
_HOMES = {
    "chargpt.storage.checkpoint": ("load_model", "save_model"),
    "chargpt.config": ("GPTConfig", "TrainConfig"),
    "chargpt.training.settings": ("make_train_config", "resume_config"),
    "chargpt.data.corpus": ("load_corpus", "shakespeare_text"),
    "chargpt.errors": ("ChargptError",),
    "chargpt.inference.evaluate": ("evaluate",),
    "chargpt.inference.generate": ("SampleConfig", "generate", "stream"),
    "chargpt.model": ("GPT", "BigramLM", "build_model"),
    "chargpt.data.tokenizer": ("CharTokenizer",),
    "chargpt.training.loop": ("TrainResult", "train"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "BigramLM",
    "GPTConfig",
    "TrainConfig",
    "SampleConfig",
    "CharTokenizer",
    "ChargptError",
    "TrainResult",
    "build_model",
    "load_model",
    "save_model",
    "load_corpus",
    "shakespeare_text",
    "make_train_config",
    "resume_config",
    "train",
    "generate",
    "stream",
    "evaluate",
    "lecture",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "lecture":  # the lecture's GPT as written (chargpt/lecture.py), a module of its own
        return importlib.import_module("chargpt.lecture")
    if name not in _HOME:
        raise AttributeError(f"module 'chargpt' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    """The public API (what `from chargpt import *` gives), for tab completion: the lazy names included."""
    return sorted(__all__)
