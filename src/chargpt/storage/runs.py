"""What `chargpt info` reads from a model folder, or a folder of runs, without writing to it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from chargpt.config import TrainConfig
from chargpt.errors import ChargptError
from chargpt.fileio import is_regular_file
from chargpt.model import build_model, shapes_only
from chargpt.storage.checkpoint import ARCH_KEY, MODEL_KEYS, load_model, read_config, run_file
from chargpt.storage.layout import BACKUP, CONFIG, MARKER, METRICS, TRAIN_STATE, WEIGHTS
from chargpt.storage.trainstate import load_train_state


def is_run_folder(directory: Path) -> bool:
    """Whether a folder holds a model or a run of its own (as opposed to a folder of runs)."""
    names = (CONFIG, TRAIN_STATE, WEIGHTS, MARKER, METRICS, BACKUP)
    return any(os.path.lexists(directory / n) for n in names)


def list_runs(directory: str | Path) -> list[dict[str, Any]]:
    """The runs in a folder of runs (each subfolder `chargpt train --out` wrote), read cheaply: config.json and
    the train state's step and clock, no weights. A subfolder that cannot be read is listed with its problem."""
    directory = Path(directory)
    runs = []
    for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink() and is_run_folder(p)):
        row: dict[str, Any] = {"name": sub.name}
        try:
            cfg, _, info = read_config(sub)
            row.update(shape=f"{cfg.n_layers}x{cfg.n_heads}x{cfg.n_embd} T{cfg.block_size}", arch=cfg.arch)
            row.update(best_step=info.get("step"), best_val_loss=info.get("val_loss"))
        except ChargptError as e:
            row["problem"] = str(e)
        try:
            if os.path.lexists(run_file(sub, TRAIN_STATE)):
                state = load_train_state(sub, mmap=True)
                row.update(steps=state.step, elapsed=float(state.elapsed))
        except ChargptError as e:
            row.setdefault("problem", str(e))
        runs.append(row)
    return runs


def describe(directory: str | Path) -> dict[str, Any]:
    """What a model directory holds, as plain data (for `chargpt info`): shape, parameters, vocabulary,
    how it was trained (saved step, losses, config; the run's latest step from train_state.pt), files."""
    directory = Path(directory)
    if not os.path.lexists(run_file(directory, CONFIG)) and os.path.lexists(run_file(directory, TRAIN_STATE)):
        return _describe_unsaved(directory)
    model, tokenizer = load_model(directory)  # validates everything, one-line errors
    cfg = model.config
    _, _, info = read_config(directory)
    training: dict[str, Any] = {
        "best_step": info.get("step"),
        "best_val_loss": info.get("val_loss"),
        "best_train_loss": info.get("train_loss"),
        "weights": info.get("weights") if isinstance(info.get("weights"), str) else None,  # as trained, or averaged
        "config": info.get("train_config"),
        "init_from": info.get("init_from"),
        "settings_from": info.get("settings_from") if isinstance(info.get("settings_from"), dict) else None,
    }
    if os.path.lexists(run_file(directory, TRAIN_STATE)):
        try:
            state = load_train_state(directory, mmap=True)
            training.update(steps=state.step, elapsed=float(state.elapsed))
        except ChargptError as e:
            training["train_state_problem"] = str(e)
    shape = {k: getattr(cfg, k) for k in sorted(MODEL_KEYS - {ARCH_KEY})}
    return {
        "dir": str(directory),
        "model": {"arch": cfg.arch, **shape},
        "parameters": model.num_params(),
        "vocab": tokenizer.to_list(),
        "training": training,
        "files": {p.name: p.lstat().st_size for p in sorted(directory.iterdir()) if is_regular_file(p)},
    }


def _describe_unsaved(directory: Path) -> dict[str, Any]:
    """A run stopped before its first evaluation saved a model: what its train state holds."""
    state = load_train_state(directory, mmap=True)
    train = TrainConfig(**{k: v for k, v in state.config.items() if k in TrainConfig.__dataclass_fields__})
    cfg = train.model_config(len(state.vocab))
    with shapes_only():
        parameters = build_model(cfg).num_params()
    shape = {k: getattr(cfg, k) for k in sorted(MODEL_KEYS - {ARCH_KEY})}
    return {
        "dir": str(directory),
        "model": {"arch": cfg.arch, **shape},
        "parameters": parameters,
        "vocab": list(state.vocab),
        "training": {"config": state.config, "steps": state.step, "elapsed": float(state.elapsed), "saved": False},
        "files": {p.name: p.lstat().st_size for p in sorted(directory.iterdir()) if is_regular_file(p)},
    }
