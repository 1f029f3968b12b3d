"""Model directories: `model.safetensors` (weights) + `config.json` (shape, vocabulary, format version),
and `train_state.pt` (what resuming needs: plain tensors, numbers and strings only).

Every file is written atomically: a temporary file in the same folder, flushed, fsynced, renamed,
and the folder fsynced. Loading never unpickles: safetensors for weights, JSON for config, and
`torch.load(weights_only=True)` for the train state.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from chargpt.config import GPTConfig
from chargpt.errors import ChargptError, first_line
from chargpt.fileio import atomic_write_bytes
from chargpt.model import GPT, BigramLM, build_model
from chargpt.tokenizer import CharTokenizer

FORMAT_NAME = "chargpt-model"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"
log = logging.getLogger("chargpt.checkpoint")
MODEL_KEYS = {"vocab_size", "block_size", "n_embd", "n_heads", "n_layers", "dropout", "model"}
# "unknown" (the vocabulary's unknown symbol) is written only by models that have one, so the files of
# models without it are byte for byte what older chargpt wrote, and older config.json files still load
CONFIG_KEYS = {"format", "format_version", "model", "vocab", "unknown", "info"}
OPTIONAL_CONFIG_KEYS = {"unknown", "info"}


def check_writable(directory: str | Path) -> None:
    """Fail before training, not after, when the output folder cannot be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ChargptError(f"cannot write to {directory} ({e.strerror}); choose another --out") from None


def holds_model(directory: str | Path) -> bool:
    d = Path(directory)
    return any((d / name).exists() for name in (WEIGHTS, CONFIG, TRAIN_STATE))


def save_model(
    directory: str | Path,
    model: GPT | BigramLM,
    tokenizer: CharTokenizer,
    info: dict[str, Any] | None = None,
) -> None:
    """Write weights, then config.json, each atomically.

    The weights file carries its own copy of the config in its metadata, and the loader trusts that copy
    when the two disagree: a crash between the two renames (new weights, old config.json) still loads
    as the new model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in plain_state_dict(model).items()}
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {k: getattr(cfg, k) for k in sorted(MODEL_KEYS)},
        "vocab": tokenizer.to_list(),
        **({"unknown": tokenizer.unknown} if tokenizer.unknown is not None else {}),
        "info": info or {},
    }
    text = json.dumps(config, indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(directory / WEIGHTS, st_save(state, metadata={"format": FORMAT_NAME, "config": text}))
    atomic_write_bytes(directory / CONFIG, text.encode())


def read_config(directory: str | Path) -> tuple[GPTConfig, CharTokenizer, dict[str, Any]]:
    """Parse and check config.json; every problem becomes a one-line ChargptError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ChargptError(
            f"model directory {directory} does not exist; train one with `chargpt train --out {directory}`"
        )
    path = directory / CONFIG
    if not path.is_file():
        raise ChargptError(
            f"{directory} holds no model ({CONFIG} is missing); point --model at a trained model directory"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ChargptError(f"cannot read {path} ({e.strerror})") from None
    return parse_config(data, str(path))


def parse_config(data: bytes | str, where: str) -> tuple[GPTConfig, CharTokenizer, dict[str, Any]]:
    """Check a config.json text: format, version, exact keys, a valid shape and vocabulary that agree."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError covers JSON syntax, bad UTF-8, huge integers
        first = first_line(e)
        raise ChargptError(f"{where} is not valid JSON ({first}); the model directory is corrupt") from None
    if not isinstance(raw, dict):
        raise ChargptError(f"{where} must hold a JSON object; the model directory is corrupt")
    if raw.get("format") != FORMAT_NAME:
        raise ChargptError(f"{where} is not a chargpt model config (format {_short(raw.get('format'))})")
    if raw.get("format_version") != FORMAT_VERSION or isinstance(raw.get("format_version"), bool):
        raise ChargptError(
            f"{where} has format version {_short(raw.get('format_version'))}; this chargpt reads version "
            f"{FORMAT_VERSION}"
        )
    _check_keys(raw, CONFIG_KEYS - OPTIONAL_CONFIG_KEYS, CONFIG_KEYS, where)
    model = raw["model"]
    if not isinstance(model, dict):
        raise ChargptError(f"'model' in {where} must be an object")
    _check_keys(model, MODEL_KEYS, MODEL_KEYS, f"'model' in {where}")
    vocab = raw["vocab"]
    if not isinstance(vocab, list):
        raise ChargptError(f"'vocab' in {where} must be a list of characters")
    unknown = raw.get("unknown")
    if unknown is not None and not (isinstance(unknown, str) and len(unknown) == 1):
        raise ChargptError(f"'unknown' in {where} must be a single character; the model directory is corrupt")
    tokenizer = CharTokenizer(vocab, unknown=unknown)
    try:
        cfg = GPTConfig(**model)
    except ChargptError as e:
        raise ChargptError(f"bad model config in {where}: {e}") from None
    if cfg.vocab_size != tokenizer.vocab_size:
        raise ChargptError(
            f"{where} says vocab_size {cfg.vocab_size} but its vocabulary has {tokenizer.vocab_size} characters"
        )
    info = raw.get("info", {})
    return cfg, tokenizer, info if isinstance(info, dict) else {}


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT | BigramLM, CharTokenizer]:
    """Load a model directory for inference (eval mode). Never executes code from the files."""
    directory = Path(directory)
    cfg, tokenizer, _ = read_config(directory)
    path = directory / WEIGHTS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ChargptError(
            f"{directory} holds no weights ({WEIGHTS} is missing); the model directory is incomplete"
        ) from None
    except OSError as e:
        raise ChargptError(f"cannot read {path} ({e.strerror})") from None
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, OverflowError, RuntimeError, TypeError) as e:
        first = first_line(e)
        raise ChargptError(f"{path} is not a valid safetensors file ({first}); it is corrupt or truncated") from None
    embedded = _safetensors_metadata(data).get("config")
    if embedded is not None:
        # the weights' own config wins: config.json may be one save older after a crash between the renames
        own_cfg, own_tokenizer, _ = parse_config(embedded, f"the config inside {path}")
        if (own_cfg, own_tokenizer) != (cfg, tokenizer):
            log.warning(
                "%s disagrees with the config inside %s (a save was cut short?); using the latter", CONFIG, path
            )
        cfg, tokenizer = own_cfg, own_tokenizer
    _check_shapes(cfg, state, str(path))
    model = build_model(cfg)
    load_state(model, state, str(path))
    return model.to(device).eval(), tokenizer


def _safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file already validated by safetensors."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    try:
        header = json.loads(data[8 : 8 + n]) if 0 < n <= len(data) - 8 else {}
    except (ValueError, RecursionError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _check_shapes(cfg: GPTConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Compare shapes before allocating, so a config claiming a huge model costs nothing."""
    if cfg.model == "gpt" and cfg.n_layers > len(state):  # every GPT layer owns tensors: this file cannot hold it
        raise ChargptError(f"{where} holds {len(state)} tensors, too few for n_layers={cfg.n_layers}; files disagree")
    try:
        with torch.device("meta"):  # shapes only, no memory
            skeleton = build_model(cfg)
    except (RuntimeError, OverflowError, ValueError) as e:
        raise ChargptError(
            f"{where}: the config describes an impossible model ({type(e).__name__}); files disagree"
        ) from None
    load_state(skeleton, state, where, copy=False)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, copy: bool = True) -> None:
    """Strictly load a state dict: same names, same shapes, float tensors, else a one-line error."""
    if not isinstance(state, dict):
        raise ChargptError(f"{where} holds no weights dictionary; the file is corrupt")
    expected = plain_state_dict(model)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ChargptError(
            f"{where} does not match the config: missing {missing[:3]}, unexpected {extra[:3]}; the files disagree"
        )
    for name, tensor in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(tensor.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ChargptError(f"{where}: tensor {name} has shape {shape}, the config needs {tuple(tensor.shape)}")
        if not got.is_floating_point():
            raise ChargptError(f"{where}: tensor {name} has dtype {got.dtype}, expected floating point")
    if not copy:
        return
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without wrappers' prefixes (torch.compile's `_orig_mod.`, DDP's `module.`)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return inner.state_dict()


def save_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(directory) / TRAIN_STATE, buf.getvalue())


def load_train_state(directory: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read train_state.pt without unpickling code (weights_only) and check its layout.

    mmap=True maps the tensors instead of reading them: for a caller that only needs the config."""
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        raise ChargptError(f"{directory} has no {TRAIN_STATE} to resume from; it was not written by `chargpt train`")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them: one line suffices
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for corrupt or hostile pickles
        first = first_line(e)
        raise ChargptError(f"{path} is corrupt or not a chargpt train state ({first})") from None
    problem = _train_state_problem(state)
    if problem:
        raise ChargptError(f"{path} is not a usable chargpt train state ({problem}); start a new run with --overwrite")
    return state


def _train_state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return "not a dictionary"
    kinds: dict[str, type | tuple[type, ...]] = {
        "step": int,
        "elapsed": (int, float),
        "best_val_loss": (int, float),
        "model": dict,
        "optimizer": dict,
        "rng": dict,
        "vocab": list,
        "config": dict,
    }
    for key, kind in kinds.items():
        if key not in state:
            return f"{key} is missing"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"{key} has type {type(state[key]).__name__}"
    if state["step"] < 0:
        return "negative step"
    if state.get("unknown") is not None and not isinstance(state["unknown"], str):  # absent before issue 12
        return f"unknown has type {type(state['unknown']).__name__}"
    rng = state["rng"]
    for key in ("torch", "batches", "numpy_keys"):
        if not isinstance(rng.get(key), torch.Tensor):
            return f"rng.{key} is not a tensor"
    if not isinstance(rng.get("numpy_pos"), int) or not isinstance(rng.get("python"), list):
        return "rng state is malformed"
    return None


def _check_keys(obj: dict, required: set[str], allowed: set[str], where: str) -> None:
    missing, extra = sorted(required - set(obj)), sorted(set(obj) - allowed)
    if missing:
        raise ChargptError(f"{where} is missing key(s) {', '.join(missing)}; the model directory is corrupt")
    if extra:
        shown = ", ".join(_short(k, 40) for k in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ChargptError(f"{where} has unknown key(s) {shown}; the model directory is corrupt")


def _short(value: Any, limit: int = 60) -> str:
    """A value for a one-line message: repr (so no raw newlines), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
