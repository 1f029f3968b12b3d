"""Model directories: `model.safetensors` (weights) + `config.json` (shape, vocabulary, format version),
and `train_state.pt` (what resuming needs: plain tensors, numbers and strings only).

Every file is written atomically: a temporary file in the same folder, flushed, fsynced, renamed,
and the folder fsynced. Loading never unpickles: safetensors for weights, JSON for config, and
`torch.load(weights_only=True)` for the train state.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from chargpt.config import GPTConfig
from chargpt.errors import ChargptError
from chargpt.model import GPT, BigramLM, build_model
from chargpt.tokenizer import CharTokenizer

FORMAT_NAME = "chargpt-model"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"
MODEL_KEYS = {"vocab_size", "block_size", "n_embd", "n_heads", "n_layers", "dropout", "model"}
CONFIG_KEYS = {"format", "format_version", "model", "vocab", "info"}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # like a normally created file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ChargptError(f"disk full while writing {path}; free some space (the old file is intact)") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    """Write weights, then config. Within a run the config never changes, so any crash leaves a pair that loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in _plain_state_dict(model).items()}
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {k: getattr(cfg, k) for k in sorted(MODEL_KEYS)},
        "vocab": tokenizer.to_list(),
        "info": info or {},
    }
    atomic_write_bytes(directory / WEIGHTS, st_save(state, metadata={"format": FORMAT_NAME}))
    atomic_write_bytes(directory / CONFIG, (json.dumps(config, indent=1, ensure_ascii=False) + "\n").encode())


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
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChargptError(f"{path} is not valid JSON ({e}); the model directory is corrupt") from None
    if not isinstance(raw, dict):
        raise ChargptError(f"{path} must hold a JSON object; the model directory is corrupt")
    if raw.get("format") != FORMAT_NAME:
        raise ChargptError(f"{path} is not a chargpt model config (format {raw.get('format')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ChargptError(
            f"{path} has format version {raw.get('format_version')!r}; this chargpt reads version {FORMAT_VERSION}"
        )
    _check_keys(raw, CONFIG_KEYS - {"info"}, CONFIG_KEYS, str(path))
    model = raw["model"]
    if not isinstance(model, dict):
        raise ChargptError(f"'model' in {path} must be an object")
    _check_keys(model, MODEL_KEYS, MODEL_KEYS, f"'model' in {path}")
    vocab = raw["vocab"]
    if not isinstance(vocab, list):
        raise ChargptError(f"'vocab' in {path} must be a list of characters")
    tokenizer = CharTokenizer(vocab)
    try:
        cfg = GPTConfig(**model)
    except TypeError as e:
        raise ChargptError(f"bad model config in {path}: {e}") from None
    except ChargptError as e:
        raise ChargptError(f"bad model config in {path}: {e}") from None
    if cfg.vocab_size != tokenizer.vocab_size:
        raise ChargptError(
            f"{path} says vocab_size {cfg.vocab_size} but its vocabulary has {tokenizer.vocab_size} characters"
        )
    info = raw.get("info", {})
    return cfg, tokenizer, info if isinstance(info, dict) else {}


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT | BigramLM, CharTokenizer]:
    """Load a model directory for inference (eval mode). Never executes code from the files."""
    directory = Path(directory)
    cfg, tokenizer, _ = read_config(directory)
    path = directory / WEIGHTS
    try:
        state = st_load(path.read_bytes())
    except FileNotFoundError:
        raise ChargptError(
            f"{directory} holds no weights ({WEIGHTS} is missing); the model directory is incomplete"
        ) from None
    except (SafetensorError, ValueError, OverflowError, RuntimeError) as e:
        raise ChargptError(f"{path} is not a valid safetensors file ({e}); the file is corrupt or truncated") from None
    model = build_model(cfg)
    load_state(model, state, str(path))
    return model.to(device).eval(), tokenizer


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strictly load a state dict: same names, same shapes, float tensors, else a one-line error."""
    expected = _plain_state_dict(model)
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


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without wrappers' prefixes (torch.compile's `_orig_mod.`, DDP's `module.`)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return inner.state_dict()


def save_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(directory) / TRAIN_STATE, buf.getvalue())


def load_train_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        raise ChargptError(f"{directory} has no {TRAIN_STATE} to resume from; it was not written by `chargpt train`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or hostile pickles
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChargptError(f"{path} is corrupt or not a chargpt train state ({first[:200]})") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ChargptError(f"{path} is not a chargpt train state; start a new run with --overwrite")
    return state


def _check_keys(obj: dict, required: set[str], allowed: set[str], where: str) -> None:
    missing, extra = sorted(required - set(obj)), sorted(set(obj) - allowed)
    if missing:
        raise ChargptError(f"{where} is missing key(s) {', '.join(missing)}; the model directory is corrupt")
    if extra:
        raise ChargptError(f"{where} has unknown key(s) {', '.join(extra)}; the model directory is corrupt")
