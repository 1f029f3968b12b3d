"""train_state.pt (and stable_state.pt): the resumable state of a run, its one schema (TrainState: the fields,
their kinds and ranges; written by save_train_state, checked field by field by load_train_state), the random
streams it captures, and the config a resume continues with."""

from __future__ import annotations

import io
import math
import os
import random
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chargpt.config import MAX_COUNT
from chargpt.errors import ChargptError, first_line, shorten
from chargpt.fileio import atomic_write_bytes, check_regular
from chargpt.storage.checkpoint import run_file, saved_model
from chargpt.storage.layout import MARKER, TRAIN_STATE


def _kind(kind: type | tuple[type, ...], default: Any = MISSING, required: bool = False) -> Any:
    """A field of the file: its kinds, and whether a file must hold it (else a state older than it may lack it)."""
    return field(default=default, metadata={"kind": kind, "required": required or default is MISSING})


NUMBER = (int, float)


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass
class Counters:
    """A run's counters: the training loop keeps them in its RunState (chargpt.training.state, which extends this
    class) as it goes, train_state.pt saves them under the same names and a resume restores them. A new resumable
    counter is one field here, with its kind and its value for a state saved before it existed."""

    step: int = _kind(int, 0, required=True)
    elapsed: float = _kind(NUMBER, 0.0, required=True)  # seconds of training so far, evaluations included
    best_val_loss: float = _kind(NUMBER, math.inf, required=True)  # +inf before the first evaluation
    log_loss_sum: float = _kind(NUMBER, 0.0)  # the training-loss row being summed
    log_loss_count: int = _kind(int, 0)
    eval_seconds: float = _kind(NUMBER, 0.0)  # what the budget reserves for the next evaluation, plot and save
    plot_seconds: float = _kind(NUMBER, 0.0)
    save_seconds: float = _kind(NUMBER, 0.0)
    evals_since_best: int = _kind(int, 0)  # --patience's count
    lr_anchor: Any = _kind(list, None)  # where an extended budget restarted the schedule (step, elapsed, lr)


@dataclass(kw_only=True)
class TrainState(Counters):
    """train_state.pt, its one description: the counters, and what else `save_train_state` writes;
    `load_train_state` checks every field (type, range) and returns them."""

    model: dict = _kind(dict)  # the weights
    optimizer: dict = _kind(dict)
    rng: dict = _kind(dict)  # capture_rng's streams
    vocab: list = _kind(list)
    config: dict = _kind(dict)  # the TrainConfig's fields
    unknown: str | None = _kind(str, None)  # the tokenizer's unknown symbol, if it has one
    threads: int | None = _kind(int, None)  # an auto run's thread count, kept on resume (same count, same bits)
    data_chars: int | None = _kind(int, None)  # the corpus's size: a resume on other data is refused
    origin: dict | None = _kind(dict, None)  # a fine-tune's source model
    average: dict | None = _kind(dict, None)  # the averaged weights by name (chargpt.training.averaging), if any
    average_steps: int = _kind(int, 0)  # how many steps they average
    run_id: str | None = _kind(str, None)  # the run's identity: its train and stable states carry the same

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def with_lists(self) -> TrainState:
        """The same state with its tuples as lists (what the list fields hold when read back)."""
        return TrainState(**{f.name: _listed(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def from_dict(cls, raw: Any) -> TrainState:
        """The state in `raw` (what torch.load read), or ValueError naming the first problem."""
        if not isinstance(raw, dict):
            raise ValueError("not a dictionary")
        values = {}
        for f in fields(cls):
            if f.name not in raw or (raw[f.name] is None and f.default is None):
                if f.metadata["required"]:
                    raise ValueError(f"{f.name} is missing")
                continue
            value = raw[f.name]
            if not isinstance(value, f.metadata["kind"]) or isinstance(value, bool):
                raise ValueError(f"{f.name} has type {type(value).__name__}")
            values[f.name] = value
        state = cls(**values)
        problem = state._problem()
        if problem:
            raise ValueError(problem)
        return state

    def _problem(self) -> str | None:
        if not 0 <= self.step <= MAX_COUNT:
            return f"step {shorten(self.step)} is out of range"
        if not math.isfinite(self.elapsed) or self.elapsed < 0:
            return f"elapsed time {shorten(self.elapsed)} is not a finite number >= 0"
        if math.isnan(self.best_val_loss) or self.best_val_loss < 0:  # +inf: no evaluation yet
            return f"best_val_loss {shorten(self.best_val_loss)} is not a loss"
        for key in ("torch", "batches", "numpy_keys"):
            if not isinstance(self.rng.get(key), torch.Tensor):
                return f"rng.{key} is not a tensor"
        if not isinstance(self.rng.get("numpy_pos"), int) or not isinstance(self.rng.get("python"), list):
            return "rng state is malformed"
        if self.average_steps < 0 or (self.average is not None and not self.average_steps):
            return f"average_steps {shorten(self.average_steps)} is out of range"
        return None


def save_train_state(directory: str | Path, state: TrainState, name: str = TRAIN_STATE) -> None:
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    atomic_write_bytes(Path(directory) / name, buf.getvalue())


def load_train_state(directory: str | Path, mmap: bool = False, name: str = TRAIN_STATE) -> TrainState:
    """Read train_state.pt (or another file of its schema, `name`) without unpickling code (weights_only) and
    check its layout.

    mmap=True maps the tensors instead of reading them: for a caller that only needs the config."""
    path = run_file(directory, name)
    if not os.path.lexists(path):
        kept = model_without_state(directory)
        if kept:
            raise ChargptError(kept)
        if os.path.lexists(Path(directory) / MARKER):
            raise ChargptError(
                f"{directory} has no {TRAIN_STATE} to resume from: its run was stopped before its first save; "
                f"start it again with `chargpt train --out {directory}` (its leftovers are replaced)"
            )
        raise ChargptError(f"{directory} has no {TRAIN_STATE} to resume from; it was not written by `chargpt train`")
    check_regular(path, "train state", follow=False)
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them: one line suffices
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for corrupt or hostile pickles
        first = first_line(e)
        raise ChargptError(f"{path} is corrupt or not a chargpt train state ({first})") from None
    try:
        return TrainState.from_dict(state)
    except ValueError as e:
        raise ChargptError(
            f"{path} is not a usable chargpt train state ({e}); start a new run with --overwrite"
        ) from None


def model_without_state(directory: str | Path) -> str:
    """For a folder whose run saved a model but no train state (it was killed before its first resumable save):
    what to do that keeps the model. Else ""."""
    saved = saved_model(directory)
    if saved is None or os.path.lexists(run_file(directory, TRAIN_STATE)):
        return ""
    folder = Path(directory)
    what = f"a model (step {saved.step}, val loss {saved.val_loss:.4f})" if saved.val_loss is not None else "a model"
    return (
        f"{folder} holds {what} but no {TRAIN_STATE} to resume from (its run was stopped before its first "
        f"resumable save); train on from that model with `chargpt train --init-from {folder} --out "
        f"{folder}-more`, which leaves {folder} as it is"
    )


def capture_rng(batches: torch.Generator) -> dict[str, Any]:
    """Every random stream a run draws from (torch, CUDA, numpy, Python, the batch generator), as plain data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(py_state[1]),
        "batches": batches.get_state(),
    }


def restore_rng(state: dict[str, Any], batches: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    batches.set_state(state["batches"])
