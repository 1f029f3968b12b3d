"""Configuration: the model's shape and the training run's settings, plus presets and TOML loading.

Precedence, lowest to highest: dataclass defaults (the classic seed model) < preset < TOML file < flags.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from chargpt.errors import ChargptError

MODEL_TYPES = ("gpt", "bigram")
# n_updates when only a time budget (max_time) is given: the clock, not a step count, ends the run
TIME_GOVERNED_UPDATES = 1_000_000_000


@dataclass
class GPTConfig:
    """The model's shape. Together with the vocabulary it fully determines the weights' layout."""

    vocab_size: int = 65
    block_size: int = 256
    n_embd: int = 384
    n_heads: int = 6
    n_layers: int = 6
    dropout: float = 0.2
    model: str = "gpt"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.model not in MODEL_TYPES:
            raise ChargptError(f"unknown model type {self.model!r}; use one of {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "block_size", "n_embd", "n_heads", "n_layers"):
            _positive_int(name, getattr(self, name))
        if self.n_embd % self.n_heads:
            raise ChargptError(
                f"n_embd ({self.n_embd}) must be divisible by n_heads ({self.n_heads}); "
                f"pick e.g. n_embd={self.n_heads * max(1, round(self.n_embd / self.n_heads))}"
            )
        _fraction("dropout", self.dropout, allow_zero=True, allow_one=False)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_heads


@dataclass
class TrainConfig:
    """Everything `chargpt train` takes. Flag `--n-embd` sets field `n_embd`, and so on."""

    # data and output
    data: str | None = None  # UTF-8 text file or folder of .txt files; None = embedded Shakespeare
    out: str = "out/model"
    val_fraction: float = 0.1
    token_cache: str | None = None  # folder of token caches; None = <cache dir>/tokens; "off" = tokenize into memory
    vocab: str = "auto"  # auto = the corpus's characters; or a UTF-8 file whose characters are the vocabulary
    min_char_count: int = 1  # with vocab auto: characters seen fewer times map to one unknown symbol
    # model shape (the classic seed model by default)
    model: str = "gpt"
    block_size: int = 256
    n_embd: int = 384
    n_heads: int = 6
    n_layers: int = 6
    dropout: float = 0.2
    # optimisation
    n_updates: int = 5000
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine decay ends at learning_rate * min_lr_ratio
    warmup_updates: int = 100
    weight_decay: float = 0.1  # applied to weight matrices only
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    beta2: float = 0.99
    # evaluation, checkpoints, budget
    eval_interval: int = 500
    eval_iters: int = 200
    checkpoint_interval: int = 500  # steps between resumable-state saves
    max_time: float = 0.0  # seconds of training; 0 = no limit. The LR schedule ends when time does.
    seed: int = 1337
    device: str = "auto"  # auto: cuda > mps > cpu
    compile: bool = False  # torch.compile the model (needs a C++ compiler on CPU; falls back cleanly)

    def validate(self) -> None:
        self.model_config(vocab_size=1)  # checks the shape fields
        for name in (
            "n_updates",
            "batch_size",
            "gradient_accumulation_steps",
            "eval_interval",
            "eval_iters",
            "checkpoint_interval",
            "min_char_count",
        ):
            _positive_int(name, getattr(self, name))
        self._validate_data_options()
        for name in ("warmup_updates",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ChargptError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        _positive_float("learning_rate", self.learning_rate)
        _fraction("val_fraction", self.val_fraction, allow_zero=False, allow_one=False)
        _fraction("min_lr_ratio", self.min_lr_ratio, allow_zero=True, allow_one=True)
        _fraction("beta2", self.beta2, allow_zero=False, allow_one=False)
        for name in ("weight_decay", "grad_clip", "max_time"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:  # `not >=` also rejects NaN
                raise ChargptError(f"{name} must be a number >= 0, got {value!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ChargptError(f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")

    def _validate_data_options(self) -> None:
        if not isinstance(self.vocab, str) or not self.vocab:
            raise ChargptError(f"vocab must be 'auto' or a UTF-8 file of characters, got {self.vocab!r}")
        if self.vocab != "auto" and self.min_char_count > 1:
            raise ChargptError(
                "min_char_count applies to vocab auto; a vocab file fixes the vocabulary: drop one of the two"
            )
        if self.token_cache is not None and (not isinstance(self.token_cache, str) or not self.token_cache):
            raise ChargptError(f"token_cache must be a folder or 'off', got {self.token_cache!r}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            n_embd=self.n_embd,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            dropout=self.dropout,
            model=self.model,
        )


# Presets set shape and optimisation defaults; a TOML file and flags still override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The classic seed model: 10.8M parameters, what the lecture trains on a GPU.
    "seed": {},
    # Tuned for the best validation loss per second of a 2-core CPU (see docs/benchmarks.md): this small
    # model sees ~2x the tokens of the mid config (n_embd 192) in the same time, and small batches give
    # it ~10 steps/s. Dropout is off for such short runs (it would also cost ~20% of the speed).
    "cpu": {
        "block_size": 128,
        "n_embd": 128,
        "n_heads": 4,
        "n_layers": 4,
        "dropout": 0.0,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "warmup_updates": 50,
        "n_updates": 5000,
        "eval_interval": 500,
        "eval_iters": 40,
        "checkpoint_interval": 500,
    },
}

TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; every key must be a TrainConfig field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChargptError(f"config file {path} does not exist; check the --config path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ChargptError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None
    unknown = sorted(set(raw) - set(TRAIN_FIELDS))
    if unknown:
        raise ChargptError(
            f"unknown key(s) in {path}: {', '.join(unknown)}; valid keys are the `chargpt train` flags "
            f"with underscores, e.g. n_embd, batch_size"
        )
    for key, value in raw.items():
        raw[key] = _coerce(key, value, str(path))
    return raw


def resolve_preset(preset: str | None, device: str) -> str:
    if preset is None:
        return "cpu" if device == "cpu" else "seed"
    if preset not in PRESETS:
        raise ChargptError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    return preset


def build_train_config(
    preset: str, toml: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Layer defaults < preset < TOML < overrides into a validated TrainConfig."""
    values: dict[str, Any] = dict(PRESETS[preset])
    values.update(toml or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check a TOML value against the field's type (ints are accepted where floats are expected)."""
    kind = TRAIN_FIELDS[key].type
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "str | None": isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise ChargptError(f"{key} in {where} must be of type {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ChargptError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not value > 0 or value != value or value == float("inf"):
        raise ChargptError(f"{name} must be a positive number, got {value!r}")


def _fraction(name: str, value: Any, *, allow_zero: bool, allow_one: bool) -> None:
    ok = isinstance(value, (int, float)) and (value > 0 or (allow_zero and value == 0))
    ok = ok and (value < 1 or (allow_one and value == 1))
    if not ok:
        lo, hi = "[0" if allow_zero else "(0", "1]" if allow_one else "1)"
        raise ChargptError(f"{name} must be in {lo}, {hi}, got {value!r}")
