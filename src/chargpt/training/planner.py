"""One planner for every run, from the command line or from Python: the settings' layers resolved once (the
preset, the TOML file, the flags, or a saved run), the model sized for a time budget where that applies, and
where each setting came from. `chargpt train` parses its flags and calls `plan`; so does `chargpt.train(...)`
when it is given settings instead of a TrainConfig, so both train the same model."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chargpt.config import SHAPE_KEYS, TrainConfig
from chargpt.errors import ChargptError
from chargpt.machine import cores
from chargpt.storage.trainstate import load_train_state
from chargpt.training import sizing
from chargpt.training.outdir import check_new_run
from chargpt.training.settings import Layer, new_run, resolve_preset, resumed, sizing_request


@dataclass(frozen=True)
class Plan:
    """What a run trains, and why: the config, each setting's source, and the announcement's line on how the
    settings were chosen."""

    config: TrainConfig
    sources: dict[str, str] = field(default_factory=dict)
    note: str = ""
    resume: bool = False


def plan(
    *,
    preset: str | None = None,
    config: str | None = None,
    resume: str | Path | None = None,
    add_time: float | None = None,
    overwrite: bool = False,
    distributed: bool = False,
    on_sizing: Callable[[str], None] | None = None,
    throughput: Callable[[sizing.Rung], float] | None = None,
    **settings: Any,
) -> Plan:
    """The plan of a run. `settings`: TrainConfig fields (None = not given); `resume`: the folder of a run to
    continue; `add_time`: with `resume`, seconds to train on (max_time = the seconds done + these); `distributed`:
    under torchrun (never sized: every process must train the same shape);
    `on_sizing`: told before the few seconds of timing that sizing takes; `throughput`: a rung's training
    tokens/s (default: timed now on this machine)."""
    if resume is not None:
        out = settings.get("out")
        if out is not None and os.path.abspath(out) != os.path.abspath(resume):
            raise ChargptError("--resume DIR continues in DIR; drop --out or make it the same directory")
        if add_time is not None:
            settings = {**settings, "max_time": _more_time(resume, add_time, settings.get("max_time"))}
        chosen = resumed(resume, preset, config, **settings)
        return Plan(chosen.config, chosen.sources, "the saved run's settings", resume=True)
    if add_time is not None:
        raise ChargptError("--add-time trains a saved run on: give it with --resume DIR (a new run takes --max-time)")
    sized = None if distributed else _sized(preset, config, overwrite, on_sizing, throughput, settings)
    layer = Layer("sized for the budget", sized.settings()) if sized else None
    chosen = new_run(preset, config, layer, **settings)
    cfg = chosen.config
    note = sized.reason if sized else _preset_note(preset, cfg, settings)
    return Plan(cfg, chosen.sources, note)


def _more_time(folder: str | Path, add_time: float, max_time: Any) -> float:
    """The run's total budget that gives `add_time` seconds more than the saved run has trained."""
    if max_time is not None:
        raise ChargptError("--add-time and --max-time both set the budget: give one (--max-time is the run's total)")
    if isinstance(add_time, bool) or not isinstance(add_time, (int, float)) or not 0 < add_time < math.inf:
        raise ChargptError(f"--add-time must be a number of seconds > 0, got {add_time}")
    return load_train_state(folder, mmap=True).elapsed + add_time


def _sized(
    preset: str | None,
    config: str | None,
    overwrite: bool,
    on_sizing: Callable[[str], None] | None,
    throughput: Callable[[sizing.Rung], float] | None,
    settings: dict[str, Any],
) -> sizing.Choice | None:
    """The rung sizing picks for a --max-time run on a CPU with no shape given (one process only), or None."""
    given = sizing_request(preset, config, **settings)
    if given is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    # every input is checked before the seconds of timing: the data and its length, an --out holding a run
    chars = sizing.corpus_chars(given.get("data"))  # the data's one-line errors: a missing file, no .txt files
    val_fraction = given.get("val_fraction") or TrainConfig.val_fraction
    sizing.context_for(chars, val_fraction)
    out = Path(given.get("out") or TrainConfig.out)
    if out.is_dir():
        check_new_run(out, overwrite)
    if on_sizing is not None:
        on_sizing(f"sizing the model for {given['max_time']:g} s: timing a few shapes on this machine ...")
    threads = cores.choose_threads(given.get("threads") or None)
    probe_s = sizing.probe_seconds(given["max_time"])
    speed = throughput or (lambda rung: sizing.measure(rung, threads, probe_s))
    return sizing.choose(given["max_time"], speed, chars, val_fraction)


def preset_here(device: str = "auto") -> tuple[str, str]:
    """The preset a run on `device` gets when none is named, and why (train --help, the announcement)."""
    try:
        preset = resolve_preset(None, device)
    except ChargptError:  # a device that cannot be looked up here: the CPU's
        preset = "cpu"
    return preset, "no GPU found" if preset == "cpu" else "a GPU was found"


def _preset_note(preset: str | None, cfg: TrainConfig, settings: dict[str, Any]) -> str:
    """How the preset was chosen, for the announcement (and a fine-tune's source)."""
    if preset:
        note = f"preset {preset} (as asked)"
    else:
        name, why = preset_here(cfg.device)
        shape = [f"--{k.replace('_', '-')}" for k in SHAPE_KEYS if k != "arch" and settings.get(k) is not None]
        if shape:  # the preset's other settings, the user's shape: no hint at another preset's model
            note = f"preset {name} ({why}) with your {', '.join(shape)}"
        else:
            other = "--preset seed for the 10.8M model" if name == "cpu" else "--preset cpu for a small model"
            note = f"preset {name} ({why}; {other})"
    return f"{note}; fine-tuning {cfg.init_from}" if cfg.init_from else note
