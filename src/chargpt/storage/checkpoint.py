"""Model directories: `model.safetensors` (weights) + `config.json` (shape, vocabulary, format version),
and `train_state.pt` (what resuming needs: plain tensors, numbers and strings only).

Every file is written atomically: a temporary file in the same folder, flushed, fsynced, renamed,
and the folder fsynced. Loading never unpickles: safetensors for weights, JSON for config, and
`torch.load(weights_only=True)` for the train state.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from chargpt.config import GPTConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError, first_line, shorten
from chargpt.fileio import atomic_write_bytes, check_regular, read_regular
from chargpt.machine import memory
from chargpt.model import LanguageModel, build_model, shapes_only
from chargpt.storage.layout import BACKUP, CONFIG, MARKER, METRICS, MOVING, TRAIN_STATE, WEIGHTS

FORMAT_NAME = "chargpt-model"
FORMAT_VERSION = 1
log = logging.getLogger("chargpt.storage.checkpoint")
ARCH_KEY = "model"  # config.json's name for GPTConfig.arch (the file format predates the field's name)
MODEL_KEYS = {"vocab_size", "block_size", "n_embd", "n_heads", "n_layers", "dropout", ARCH_KEY}
# "unknown" (the vocabulary's unknown symbol) is written only by models that have one, so the files of
# models without it are byte for byte what older chargpt wrote, and older config.json files still load
CONFIG_KEYS = {"format", "format_version", "model", "vocab", "unknown", "info"}
OPTIONAL_CONFIG_KEYS = {"unknown", "info"}


def save_model(
    directory: str | Path,
    model: LanguageModel,
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
        "model": {k: getattr(cfg, "arch" if k == ARCH_KEY else k) for k in sorted(MODEL_KEYS)},
        "vocab": tokenizer.to_list(),
        **({"unknown": tokenizer.unknown} if tokenizer.unknown is not None else {}),
        "info": info or {},
    }
    text = json.dumps(config, indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(directory / WEIGHTS, st_save(state, metadata={"format": FORMAT_NAME, "config": text}))
    atomic_write_bytes(directory / CONFIG, text.encode())


def run_file(directory: str | Path, name: str) -> Path:
    """Where the folder's current run keeps file `name`, found without changing anything: an overwrite that
    was cut short before its first save leaves the previous run in BACKUP (or half moved, in MOVING); the
    next `chargpt train` on the folder puts it back, a reader reads it where it is. A link in their place is
    refused: reading never follows a link out of the folder."""
    directory = Path(directory)
    for folder in (BACKUP, MOVING):
        path = directory / folder
        if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
            raise ChargptError(
                f"{path} is not a folder chargpt made (a link or a file); chargpt never follows links in a model "
                f"folder: remove it"
            )
    if (directory / BACKUP).is_dir():
        return directory / BACKUP / name
    moved = directory / MOVING / name
    return moved if os.path.lexists(moved) else directory / name


def read_config(directory: str | Path) -> tuple[GPTConfig, CharTokenizer, dict[str, Any]]:
    """Parse and check config.json; every problem becomes a one-line ChargptError."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ChargptError(
            f"{directory} is a file, not a model directory; --model takes the folder `chargpt train --out` wrote"
        )
    if not directory.is_dir():
        raise ChargptError(
            f"model directory {directory} does not exist; train one with `chargpt train --out {directory}`"
        )
    if not os.access(directory, os.R_OK | os.X_OK):
        raise ChargptError(f"cannot read model directory {directory} (permission denied); check its permissions")
    path = run_file(directory, CONFIG)
    if not os.path.lexists(path):
        raise ChargptError(no_model_message(directory))
    data = read_regular(path, "model config", limit=CONFIG_LIMIT, follow=False)
    return parse_config(data, str(path))


def no_model_message(directory: Path) -> str:
    """Why a folder has no model to read, and what to do: train one, resume the run, or start it again."""
    if os.path.lexists(run_file(directory, TRAIN_STATE)):
        return (
            f"{directory} holds a run stopped before its first evaluation saved a model; continue it with "
            f"`chargpt train --resume {directory}`"
        )
    if any(os.path.lexists(directory / n) for n in (MARKER, METRICS)):
        return (
            f"{directory} holds no model: a run started there was stopped before it saved anything; start it "
            f"again with `chargpt train --out {directory}` (its leftovers are replaced)"
        )
    return f"{directory} holds no model ({CONFIG} is missing); give the folder `chargpt train --out` wrote"


CONFIG_LIMIT = 64 << 20  # the largest vocabulary (all of Unicode) takes ~10 MB of JSON


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
        raise ChargptError(f"{where} is not a chargpt model config (format {shorten(raw.get('format'))})")
    if raw.get("format_version") != FORMAT_VERSION or isinstance(raw.get("format_version"), bool):
        raise ChargptError(
            f"{where} has format version {shorten(raw.get('format_version'))}; this chargpt reads version "
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
    if any(isinstance(c, str) and any("\ud800" <= ch <= "\udfff" for ch in c) for c in [*vocab, unknown or ""]):
        raise ChargptError(
            f"the vocabulary in {where} holds a lone surrogate (not a character UTF-8 can hold); the model "
            f"directory is corrupt"
        )
    tokenizer = CharTokenizer(vocab, unknown=unknown)
    try:
        cfg = GPTConfig(**{"arch" if k == ARCH_KEY else k: v for k, v in model.items()})
    except ChargptError as e:
        raise ChargptError(f"bad model config in {where}: {e}") from None
    if cfg.vocab_size != tokenizer.vocab_size:
        raise ChargptError(
            f"{where} says vocab_size {cfg.vocab_size} but its vocabulary has {tokenizer.vocab_size} characters"
        )
    info = raw.get("info", {})
    return cfg, tokenizer, info if isinstance(info, dict) else {}


@dataclass(frozen=True)
class SavedModel:
    """The step and val loss a folder's model was saved at (None where its config.json records no usable one)."""

    step: int | None
    val_loss: float | None


def saved_model(directory: str | Path) -> SavedModel | None:
    """The model saved in `directory` (what a resumed run must beat), read from the weights' own copy of
    config.json where they hold one (the newer of the two after a cut-short save), or None when the folder holds
    no readable model."""
    path = run_file(directory, WEIGHTS)
    try:
        check_regular(path, "weights file", follow=False)
        with safe_open(str(path), framework="pt") as f:
            embedded = (f.metadata() or {}).get("config")
        info = parse_config(embedded, str(path))[2] if embedded else read_config(directory)[2]
    except (OSError, ChargptError, SafetensorError, ValueError):
        return None
    step, val = info.get("step"), info.get("val_loss")
    usable_val = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
    return SavedModel(
        step if isinstance(step, int) and not isinstance(step, bool) else None, float(val) if usable_val else None
    )


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[LanguageModel, CharTokenizer]:
    """Load a model directory for inference (eval mode). Never executes code from the files.

    The safetensors header is checked against the file size and the config before any tensor data is read,
    so a header claiming a huge tensor costs nothing."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"load_model() takes a model folder's path, got {type(directory).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ChargptError(f"unknown device {shorten(device)}; use cpu, cuda, cuda:N or mps") from None
    directory = Path(directory)
    cfg, tokenizer, _ = read_config(directory)
    path = run_file(directory, WEIGHTS)
    if not os.path.lexists(path):
        raise ChargptError(f"{directory} holds no weights ({WEIGHTS} is missing); the model directory is incomplete")
    size = check_regular(path, "weights file", follow=False)
    try:
        with safe_open(str(path), framework="pt") as f:  # the header, checked by safetensors; no tensor read yet
            cfg, tokenizer = _trusted_config(cfg, tokenizer, f.metadata() or {}, path)
            _check_tensors(cfg, {name: f.get_slice(name) for name in f.keys()}, str(path))
            memory.check(3 * size, torch.device("cpu"), f"loading {path}", "use a machine with more memory")
            model = build_model(cfg)
            with torch.no_grad():
                for name, tensor in plain_state_dict(model).items():
                    tensor.copy_(f.get_tensor(name))
    except (SafetensorError, ValueError, OverflowError, RuntimeError, TypeError) as e:
        raise ChargptError(
            f"{path} is not a valid safetensors file ({first_line(e)}); it is corrupt or truncated"
        ) from None
    broken = [name for name, t in model.state_dict().items() if not torch.isfinite(t).all()]
    if broken:
        raise ChargptError(
            f"{path} holds NaN or infinite weights (in {broken[0]}); the model is broken, e.g. saved by a "
            f"diverged run: retrain it or use another model"
        )
    return model.to(device).eval(), tokenizer


def _trusted_config(
    cfg: GPTConfig, tokenizer: CharTokenizer, metadata: dict[str, str], path: Path
) -> tuple[GPTConfig, CharTokenizer]:
    """The weights' own config (in their metadata) wins over config.json, which may be one save older after a
    crash between the two renames."""
    embedded = metadata.get("config")
    if embedded is None:
        return cfg, tokenizer
    own_cfg, own_tokenizer, _ = parse_config(embedded, f"the config inside {path}")
    if (own_cfg, own_tokenizer) != (cfg, tokenizer):
        log.warning("%s disagrees with the config inside %s (a save was cut short?); using the latter", CONFIG, path)
    return own_cfg, own_tokenizer


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_tensors(cfg: GPTConfig, tensors: dict[str, Any], where: str) -> None:
    """Names, shapes and dtypes of the file's tensors (safetensors slices: no data read) against the config's
    model, before anything is allocated: the one check of what a weights file holds."""
    if cfg.arch == "gpt" and cfg.n_layers > len(tensors):  # every layer owns tensors: checked before building
        raise ChargptError(f"{where} holds {len(tensors)} tensors, too few for n_layers={cfg.n_layers}; files disagree")
    try:
        with shapes_only():  # no memory
            expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    except (RuntimeError, OverflowError, ValueError, MemoryError) as e:
        raise ChargptError(
            f"{where}: the config describes an impossible model ({type(e).__name__}); files disagree"
        ) from None
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ChargptError(
            f"{where} does not match the config: missing {missing[:3]}, unexpected {[shorten(k) for k in extra[:3]]}; "
            f"the files disagree"
        )
    for name, shape in expected.items():
        dtype = tensors[name].get_dtype()
        if dtype not in FLOAT_DTYPES:
            raise ChargptError(f"{where}: tensor {name} has dtype {shorten(dtype)}, expected a float type")
        if tuple(tensors[name].get_shape()) != shape:
            raise ChargptError(
                f"{where}: tensor {name} has shape {shorten(tensors[name].get_shape())}, the config needs {shape}"
            )


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
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
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without wrappers' prefixes (torch.compile's `_orig_mod.`, DDP's `module.`)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return inner.state_dict()


def _check_keys(obj: dict, required: set[str], allowed: set[str], where: str) -> None:
    missing, extra = sorted(required - set(obj)), sorted(set(obj) - allowed)
    if missing:
        raise ChargptError(f"{where} is missing key(s) {', '.join(missing)}; the model directory is corrupt")
    if extra:
        shown = ", ".join(shorten(k, 40) for k in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ChargptError(f"{where} has unknown key(s) {shown}; the model directory is corrupt")
