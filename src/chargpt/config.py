"""Every config decision: the model's shape, the training run's settings, presets, TOML, and resume's config.

Precedence, lowest to highest: dataclass defaults (the classic seed model) < preset < TOML file < flags.
Building a config needs no torch, except to look for a GPU when the device is `auto` and no preset is named.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from chargpt.errors import ChargptError, shorten
from chargpt.fileio import read_regular

MODEL_TYPES = ("gpt", "bigram", "lecture")
# upper bounds: far past any real run, well inside what torch's int64 arithmetic and the memory check handle
MAX_SIZE = 2**31 - 1  # block_size, n_embd, n_heads, n_layers, batch sizes
MAX_COUNT = 10**12  # steps and intervals
MAX_EVAL_ITERS = 1_000_000  # batches per loss estimate (evaluation also checks for signals between batches)
MAX_SEED = 2**32 - 1
MAX_THREADS = 4096  # more is a typo (and torch would try to start them); the cores bound it further
MAX_VOCAB = 0x110000  # every Unicode code point
TOML_LIMIT = 16 << 20  # bytes: a settings file, not a corpus
# on resume these are the run's identity: its weights' shape and its data (and so its vocabulary)
RESUME_FIXED = ("arch", "block_size", "n_embd", "n_heads", "n_layers", "data", "val_fraction", "init_from", "optimizer")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: per device and kind of work, what is faster here (precision.py)
QUANTIZE = ("auto", "none", "int8")  # int8 weights for sampling/serving/eval (chargpt.inference.quantize)
OPTIMIZERS = ("adamw", "muon")  # muon: Muon for the blocks' matrices, AdamW for the rest (chargpt.training.optim)
SCHEDULES = ("cosine", "wsd")
WINDOW_ORDERS = ("random", "shuffled")  # where training windows start (chargpt.data.corpus)
# what runs saved before n_updates could be None (the clock alone ends the run) hold in its place
OLD_TIME_GOVERNED_UPDATES = 1_000_000_000


@dataclass
class GPTConfig:
    """The model's shape. Together with the vocabulary it fully determines the weights' layout."""

    vocab_size: int = 65
    block_size: int = 256
    n_embd: int = 384
    n_heads: int = 6
    n_layers: int = 6
    dropout: float = 0.2
    arch: str = "gpt"  # gpt, bigram or lecture (TrainConfig.arch, --arch; config.json calls it "model")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.arch not in MODEL_TYPES:
            raise ChargptError(f"unknown model type {shorten(self.arch)}; use one of {', '.join(MODEL_TYPES)}")
        _positive_int("vocab_size", self.vocab_size, MAX_VOCAB)
        for name in ("block_size", "n_embd", "n_heads", "n_layers"):
            _positive_int(name, getattr(self, name), MAX_SIZE)
        if self.n_embd % self.n_heads:
            raise ChargptError(
                f"n_embd ({self.n_embd}) must be divisible by n_heads ({self.n_heads}); "
                f"pick e.g. n_embd={self.n_heads * max(1, round(self.n_embd / self.n_heads))}"
            )
        _fraction("dropout", self.dropout, allow_zero=True, allow_one=False)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_heads


def setting(default: Any = MISSING, help: str = "", **flag: Any) -> Any:
    """A settings field with its one-line description, which the command's --help shows for its flag; `flag`: how
    chargpt.cli.parser makes the flag (metavar, choices, required, action, name, default_factory), where it differs
    from what the field's type says."""
    factory = flag.pop("default_factory", MISSING)
    return field(default=default, default_factory=factory, metadata={"help": help, "flag": flag})


DEVICE_HELP = "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps"
# the device names a setting may hold (chargpt.machine.devices resolves them to a torch device)
NAMES = "auto, cpu, cuda, cuda:N or mps"


def known_device(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    if name in ("auto", "cpu", "cuda", "mps"):
        return True
    index = name.removeprefix("cuda:")
    return name.startswith("cuda:") and index.isdigit() and index.isascii() and len(index) <= 4


def check_device(name: Any) -> str:
    """The name, if chargpt knows it; else a one-line error."""
    if not known_device(name):
        raise ChargptError(f"unknown device {shorten(name)}; use {NAMES}")
    return name


@dataclass
class TrainConfig:
    """Everything `chargpt train` takes. Flag `--n-embd` sets field `n_embd`, and so on."""

    # data and output
    # None = the embedded Shakespeare plays
    data: str | None = setting(
        None,
        "UTF-8 text file, folder of .txt files, or quoted glob ('books/**/*.txt') to train on",
        group="data",
        metavar="PATH",
    )
    out: str = setting("out/model", "model directory to write", group="evaluation and checkpoints", metavar="PATH")
    val_fraction: float = setting(0.1, "the last part of the text held out for validation", group="data")
    # None = <cache dir>/tokens
    token_cache: str | None = setting(
        None, "folder for the tokenized corpus (memory-mapped); off = tokenize into memory", group="data", metavar="DIR"
    )
    vocab: str = setting(
        "auto",
        "auto (the corpus's characters) or a UTF-8 file whose characters are the vocabulary",
        group="data",
        metavar="NAME",
    )
    min_char_count: int = setting(
        1, "with --vocab auto: rarer characters map to one unknown symbol (U+FFFD)", group="data"
    )
    init_from: str | None = setting(
        None,
        "fine-tune: start from this trained model's weights (its shape; the new text's characters are added); "
        "the learning rate defaults to a third of the preset's, warm-up to 20 steps",
        group="data",
        metavar="DIR",
    )
    # model shape (the classic seed model by default)
    # gpt, bigram or lecture (saved configs and TOML files may still call it `model`)
    arch: str = setting(
        "gpt",
        "the model: gpt; bigram (the lecture's baseline); or lecture (the lecture's GPT as written: the same model, "
        "per head and slower; chargpt.lecture)",
        group="model",
        choices=MODEL_TYPES,
    )
    block_size: int = setting(256, "context length in characters", group="model")
    n_embd: int = setting(384, "embedding width", group="model")
    n_heads: int = setting(6, "attention heads per layer (must divide n_embd)", group="model")
    n_layers: int = setting(6, "transformer blocks", group="model")
    dropout: float = setting(0.2, "dropout probability while training", group="model")
    # optimisation
    n_updates: int | None = setting(
        5000, "optimizer steps (with only --max-time given: none, the clock alone ends the run)", group="optimisation"
    )
    batch_size: int = setting(64, "sequences per step (global, across all processes)", group="optimisation")
    gradient_accumulation_steps: int = setting(
        1, "micro-batches per step; same global batch, less memory", group="optimisation"
    )
    optimizer: str = setting(
        "adamw",
        "adamw, or muon (Muon for the blocks' matrices, AdamW for embeddings, head, biases, gains)",
        group="optimisation",
        choices=OPTIMIZERS,
    )
    learning_rate: float = setting(
        3e-4,
        "peak learning rate (Muon's updates are scaled to AdamW's size: one rate serves both)",
        group="optimisation",
    )
    schedule: str = setting(
        "cosine",
        "after warm-up: cosine decay, or wsd (flat, then linear decay over the last --decay-fraction)",
        group="optimisation",
        choices=SCHEDULES,
    )
    decay_fraction: float = setting(
        0.2, "wsd: the part of the budget (steps or --max-time) the final decay takes", group="optimisation"
    )
    min_lr_ratio: float = setting(0.1, "the decay ends at learning_rate x this", group="optimisation")
    warmup_updates: int = setting(100, "linear warm-up steps", group="optimisation")
    weight_decay: float = setting(
        0.1, "weight decay (AdamW's and Muon's) on weight matrices only", group="optimisation"
    )
    grad_clip: float = setting(1.0, "max gradient norm; 0 = off", group="optimisation")
    beta2: float = setting(0.99, "AdamW second-moment decay (0.99 suits small batches)", group="optimisation")
    window_order: str = setting(
        "random",
        "training windows: random (each at a random start, the classic), or shuffled (each pass over the text cut "
        "into back-to-back windows from a random offset, in a random order: every character once a pass)",
        group="optimisation",
        choices=WINDOW_ORDERS,
    )
    ema: float = setting(
        0.0,
        "keep a moving average of the weights with this decay per step (0.995: a half-life of 138 steps), scored "
        "beside the trained weights at each evaluation; the better is saved; 0 = off",
        group="optimisation",
    )
    # evaluation, checkpoints, budget
    eval_interval: int = setting(
        500, "steps between evaluations (metrics row, best-val checkpoint, plot)", group="evaluation and checkpoints"
    )
    eval_iters: int = setting(200, "batches per loss estimate", group="evaluation and checkpoints")
    log_interval: int = setting(
        10, "steps between training-loss rows in metrics.jsonl", group="evaluation and checkpoints"
    )
    checkpoint_interval: int = setting(
        500, "steps between saves of the resumable state; 0 = by time only", group="evaluation and checkpoints"
    )
    checkpoint_seconds: float = setting(
        0.0,
        "also save the resumable state every this many seconds of training; 0 = off",
        group="evaluation and checkpoints",
    )
    max_time: float = setting(
        0.0,
        "wall-clock budget in seconds for the training loop, evaluations included; the LR schedule ends with it",
        group="optimisation",
    )
    patience: int = setting(
        0,
        "stop after N evaluations in a row without a better val loss (the best model is kept); 0 = never",
        group="evaluation and checkpoints",
    )
    seed: int = setting(1337, "seeds weights, batches and dropout: same seed, same run", group="optimisation")
    device: str = setting("auto", DEVICE_HELP, group="hardware")
    # falls back cleanly (with a warning) where it cannot compile
    compile: bool = setting(False, "torch.compile the model (needs a C++ compiler on CPU)", group="hardware")
    threads: int = setting(
        0, "CPU threads; 0 = auto: the cores free at the start, re-checked when steps slow down", group="hardware"
    )
    # bf16 is autocast only: weights, gradients and optimizer state stay fp32
    precision: str = setting(
        "auto",
        "auto (bf16 autocast where this machine runs it faster, else fp32), fp32, bf16",
        group="hardware",
        choices=PRECISIONS,
    )

    def validate(self) -> None:
        self.model_config(vocab_size=1)  # checks the shape fields
        for name, limit in (
            *([("n_updates", MAX_COUNT)] if self.n_updates is not None else []),
            ("batch_size", MAX_SIZE),
            ("gradient_accumulation_steps", MAX_SIZE),
            ("eval_interval", MAX_COUNT),
            ("eval_iters", MAX_EVAL_ITERS),
            ("log_interval", MAX_COUNT),
            ("min_char_count", MAX_COUNT),
        ):
            _positive_int(name, getattr(self, name), limit)
        self._validate_data_options()
        for name, limit in (
            ("warmup_updates", MAX_COUNT),
            ("checkpoint_interval", MAX_COUNT),
            ("seed", MAX_SEED),
            ("threads", MAX_THREADS),
            ("patience", MAX_COUNT),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                raise ChargptError(f"{name} must be a non-negative integer up to {limit}, got {shorten(value)}")
        _positive_float("learning_rate", self.learning_rate)
        _fraction("val_fraction", self.val_fraction, allow_zero=False, allow_one=False)
        _fraction("min_lr_ratio", self.min_lr_ratio, allow_zero=True, allow_one=True)
        _fraction("decay_fraction", self.decay_fraction, allow_zero=True, allow_one=True)
        check_name("optimizer", self.optimizer, OPTIMIZERS)
        check_name("schedule", self.schedule, SCHEDULES)
        check_name("window_order", self.window_order, WINDOW_ORDERS)
        _fraction("ema", self.ema, allow_zero=True, allow_one=False)
        _fraction("beta2", self.beta2, allow_zero=False, allow_one=False)
        for name in ("weight_decay", "grad_clip", "max_time", "checkpoint_seconds"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not 0 <= value < float("inf"):  # `not >=` also rejects NaN
                raise ChargptError(f"{name} must be a number >= 0, got {shorten(value)}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ChargptError(f"init_from must name a trained model folder, got {shorten(self.init_from)}")
        for name in PATH_KEYS:
            value = str(getattr(self, name) or "")
            check_path(name, value or None)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a file name that is not UTF-8 (Python holds its bytes as surrogates)
                raise ChargptError(
                    f"{name} {value.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')!r} is not UTF-8; "
                    f"the run records its paths in JSON, which holds UTF-8 only: choose a UTF-8 name"
                ) from None
        if not isinstance(self.out, str) or not self.out.strip():
            raise ChargptError("--out must name a folder, got an empty path; e.g. --out out/my-model")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise ChargptError("--data must name a file or folder, got an empty path")
        device = self.device
        check_device(device)
        check_name("precision", self.precision, PRECISIONS)
        if self.n_updates is None and not self.max_time:
            raise ChargptError("a run needs n_updates or max_time: give --n-updates N or --max-time SECONDS")

    def _validate_data_options(self) -> None:
        if not isinstance(self.vocab, str) or not self.vocab:
            raise ChargptError(f"vocab must be 'auto' or a UTF-8 file of characters, got {self.vocab!r}")
        if self.vocab != "auto" and self.min_char_count > 1:
            raise ChargptError(
                "min_char_count applies to vocab auto; a vocab file fixes the vocabulary: drop one of the two"
            )
        if self.token_cache is not None and (not isinstance(self.token_cache, str) or not self.token_cache):
            raise ChargptError(f"token_cache must be a folder or 'off', got {self.token_cache!r}")

    @property
    def step_limit(self) -> float:
        """n_updates, or no limit (infinity) when the clock alone ends the run."""
        return math.inf if self.n_updates is None else self.n_updates

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            n_embd=self.n_embd,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            dropout=self.dropout,
            arch=self.arch,
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
    # The default on a CUDA GPU: the seed model with nanoGPT shakespeare_char's learning rate (1e-3: on a GPU it
    # reaches a given loss sooner than 3e-4; docs/benchmarks.md has the runs). Evaluation kept cheap
    # (each one is wall time the budget does not count) and the 130 MB resumable state written by time, not
    # every 500 steps (at ~50 steps/s that was 1.6 GB per run).
    "gpu": {
        "learning_rate": 1e-3,
        "eval_interval": 500,
        "eval_iters": 50,
        "checkpoint_interval": 0,
        "checkpoint_seconds": 60.0,
    },
}

TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}
# old names of TrainConfig fields, still read from TOML files, saved runs and Python keyword arguments
RENAMED = {"model": "arch"}


def renamed(values: dict[str, Any]) -> dict[str, Any]:
    """A saved or given config's fields as today's: old names mapped to new ones (an explicit new name wins over
    an old one), and the stand-in step count that old runs saved for "the clock ends the run" read as none."""
    out = {RENAMED.get(k, k): v for k, v in values.items() if k not in RENAMED}
    for old, new in RENAMED.items():
        if old in values and out.get(new) is None:
            out[new] = values[old]
    if out.get("n_updates") == OLD_TIME_GOVERNED_UPDATES and out.get("max_time"):
        out["n_updates"] = None
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; every key must be a TrainConfig field."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ChargptError(f"config file {path} does not exist; check the --config path")
    data = read_regular(path, "config file", limit=TOML_LIMIT)
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise ChargptError(f"config file {path} is not valid TOML ({shorten(str(e), 200)}); fix the syntax") from None
    raw = renamed(raw)
    unknown = sorted(set(raw) - set(TRAIN_FIELDS))
    if unknown:
        shown = ", ".join(k if len(k) <= 40 else k[:37] + "..." for k in unknown[:5]) + (
            " ..." if len(unknown) > 5 else ""
        )
        raise ChargptError(
            f"unknown key(s) in {path}: {shown}; valid keys are the `chargpt train` flags "
            f"with underscores, e.g. n_embd, batch_size"
        )
    for key, value in raw.items():
        raw[key] = _coerce(key, value, str(path))
        if key in PATH_KEYS:
            check_path(f"{key} in {path}", raw[key])
    return expand_home(raw)


def expand_home(values: dict[str, Any]) -> dict[str, Any]:
    """The path settings with a leading ~ or ~user expanded as a shell does (a TOML file, `--out=~/x` and the
    Python API get no shell to do it): never a folder literally named ~."""
    return {k: os.path.expanduser(v) if k in PATH_KEYS and isinstance(v, str) else v for k, v in values.items()}


PATH_KEYS = ("data", "out", "vocab", "token_cache", "init_from")  # the settings that name files or folders


def check_path(name: str, value: Any) -> None:
    """A path that is empty or holds a NUL byte is a mistake (an empty shell variable, a bad paste), said at once
    wherever it was given (a flag, a TOML file, a saved run) instead of failing deep inside."""
    if value == "":
        raise ChargptError(f"{name} got an empty path; give a file or folder (is a shell variable empty?)")
    if isinstance(value, str) and "\0" in value:
        raise ChargptError(f"{name} contains a NUL byte, which no path can hold; check the value")


SHAPE_KEYS = ("arch", "block_size", "n_embd", "n_heads", "n_layers")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check a TOML value against the field's type (ints are accepted where floats are expected)."""
    kind = TRAIN_FIELDS[key].type
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "int | None": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "str | None": isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise ChargptError(f"{key} in {where} must be of type {kind}, got {shorten(value)}")
    return float(value) if kind == "float" else value


def check_name(what: str, value: Any, allowed: tuple[str, ...]) -> str:
    """One of a setting's named choices (precision, quantization, optimizer, ...), else a one-line error."""
    if value not in allowed:
        raise ChargptError(f"unknown {what} {shorten(value)}; use one of {', '.join(allowed)}")
    return value


def _positive_int(name: str, value: Any, limit: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ChargptError(f"{name} must be a positive integer, got {shorten(value)}")
    if value > limit:
        raise ChargptError(f"{name} must be at most {limit}, got {shorten(value)}")


def _positive_float(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ChargptError(f"{name} must be a positive number, got {shorten(value)}")


def _fraction(name: str, value: Any, *, allow_zero: bool, allow_one: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0))
    ok = ok and (value < 1 or (allow_one and value == 1))
    if not ok:
        lo, hi = "[0" if allow_zero else "(0", "1]" if allow_one else "1)"
        raise ChargptError(f"{name} must be in {lo}, {hi}, got {shorten(value)}")
