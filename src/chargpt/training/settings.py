"""A run's settings, resolved in one place, with where each came from.

The settings come in layers, each named as the user would say where its values came from; later layers win:

    a new run   defaults < preset < sized for the budget < --config TOML < flags < the time rule,
                then a fine-tune's source model (its shape; gentler defaults where none was given)
    a resume    the saved run < --preset < --config TOML < flags < the time rule (the shape and the data stay)

The time rule: a --max-time without a step count lets the clock govern the run (no preset's step count may end
it, and its schedule, early). `resolve` merges the layers and returns the config with each setting's source,
which the announcement and `info` show. chargpt.config holds the settings themselves (fields, presets, TOML);
this layer may read a model folder (a fine-tune's source, a saved run), which the config layer never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chargpt.config import (
    PRESETS,
    RESUME_FIXED,
    SHAPE_KEYS,
    TRAIN_FIELDS,
    TrainConfig,
    check_device,
    expand_home,
    known_device,
    load_toml,
    renamed,
)
from chargpt.errors import ChargptError, shorten
from chargpt.machine.devices import resolve_device
from chargpt.storage.trainstate import load_train_state
from chargpt.training.finetune import fill_config

PRESET_KEYS = tuple(sorted({k for p in PRESETS.values() for k in p}))
FLAG = "--{flag}"  # the name of the flags' layer: each setting's source is its own flag
CLOCK_ONLY = object()  # a layer's n_updates that merge() turns into None: no step count, the clock ends the run


@dataclass(frozen=True)
class Layer:
    """Settings from one place: `name` says where (FLAG: each setting's own flag), `values` what."""

    name: str
    values: dict[str, Any]

    def source(self, key: str) -> str:
        return FLAG.format(flag=key.replace("_", "-")) if self.name == FLAG else self.name


@dataclass(frozen=True)
class Settings:
    """A resolved run's settings, and for every setting not left at its default the layer that set it."""

    config: TrainConfig
    sources: dict[str, str] = field(default_factory=dict)

    def described(self) -> str:
        return describe(self.config, self.sources)


def describe(cfg: TrainConfig, sources: dict[str, str]) -> str:
    """'n_embd 128, n_layers 4 (sized for the budget); learning_rate 0.003 (preset cpu); seed 3 (flags)': each
    setting that was set, grouped by where (the paths, and n_updates when the clock ends the run, left out: said
    elsewhere)."""
    by_source: dict[str, list[str]] = {}
    for key, source in sources.items():
        value = getattr(cfg, key, None)
        if key in ("out", "data") or (key == "n_updates" and value is None):
            continue
        flagged = source == FLAG.format(flag=key.replace("_", "-"))  # the command line's own flags: one group
        by_source.setdefault("flags" if flagged else source, []).append(f"{key} {shorten(value, 40)}")
    return "; ".join(f"{', '.join(items)} ({source})" for source, items in by_source.items())


def merge(layers: Sequence[Layer]) -> tuple[dict[str, Any], dict[str, str]]:
    """The layers' values, later over earlier (None means 'not given'; CLOCK_ONLY sets n_updates to None), and
    each value's source."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        for key, value in layer.values.items():
            if value is not None:
                values[key], sources[key] = value, layer.source(key)
    return {k: None if v is CLOCK_ONLY else v for k, v in values.items()}, sources


def resolve(layers: Sequence[Layer], given: Sequence[Layer] = ()) -> Settings:
    """Merge the layers into a validated TrainConfig. `given`: the layers the user gave explicitly (TOML, flags),
    which a fine-tune's source shape may not contradict."""
    values, sources = merge(layers)
    if values.get("init_from") is not None:  # a fine-tune: the shape is the model's, the defaults gentler
        explicit, explicit_sources = merge(given)
        values.setdefault("learning_rate", TRAIN_FIELDS["learning_rate"].default)
        before = dict(values)
        fill_config(values, explicit, explicit_sources)
        for key in values:
            if values[key] != before.get(key):
                sources[key] = (
                    f"the fine-tune of {values['init_from']}" if key in SHAPE_KEYS else "fine-tuning defaults"
                )
    cfg = TrainConfig(**values)
    cfg.validate()
    return Settings(cfg, sources)


def explicit_layers(preset: str | None, config_path: str | None, flags: dict[str, Any]) -> list[Layer]:
    """What a command gives explicitly: --preset (every setting some preset sets), --config, the flags, and the
    time rule."""
    layers = []
    if preset is not None:
        chosen = PRESETS[resolve_preset(preset, "cpu")]
        layers.append(Layer(f"--preset {preset}", {k: chosen.get(k, TRAIN_FIELDS[k].default) for k in PRESET_KEYS}))
    layers += _given(config_path, flags)
    return layers


def _given(config_path: str | None, flags: dict[str, Any], time_rule: bool = True) -> list[Layer]:
    flags = expand_home(renamed(flags))
    unknown = sorted(set(flags) - set(TRAIN_FIELDS))
    if unknown:
        raise ChargptError(f"unknown training option(s): {', '.join(unknown)}")
    layers = [Layer(f"--config {config_path}", load_toml(config_path))] if config_path else []
    layers.append(Layer(FLAG, {k: v for k, v in flags.items() if v is not None}))
    given, _ = merge(layers)
    if time_rule and given.get("max_time") and "n_updates" not in given:  # the clock governs the run
        layers.append(Layer("--max-time without a step count", {"n_updates": CLOCK_ONLY}))
    return layers


def new_run(
    preset: str | None = None, config_path: str | None = None, sized: Layer | None = None, **flags: Any
) -> Settings:
    """A new run's settings: defaults < preset (auto: 'cpu' on a CPU, 'gpu' on CUDA, 'seed' elsewhere) < sized
    (chargpt.training.sizing's choice for the budget) < TOML < flags < the time rule; then a fine-tune's source."""
    given = _given(config_path, flags)
    device = merge(given)[0].get("device") or "auto"
    check_device(device)
    name = resolve_preset(preset, device)
    base = Layer(f"--preset {name}" if preset else f"preset {name}", PRESETS[name])
    return resolve([base, *([sized] if sized else []), *given], given)


def make_train_config(
    preset: str | None = None, config_path: str | None = None, sized: dict[str, Any] | None = None, **overrides: Any
) -> TrainConfig:
    """A new run's TrainConfig as `chargpt train` builds it (see new_run); sized: chargpt.training.sizing's
    settings for the budget."""
    return new_run(preset, config_path, Layer("sized for the budget", sized) if sized else None, **overrides).config


def sizing_request(preset: str | None, config_path: str | None, **flags: Any) -> dict[str, Any] | None:
    """The settings given (TOML < flags) when the model should be sized for the time budget
    (chargpt.training.sizing), else None: sizing applies to --max-time on a CPU where no preset, shape setting,
    step count or --init-from is given."""
    given, _ = merge(_given(config_path, flags, time_rule=False))
    budget = given.get("max_time")
    if preset is not None or not isinstance(budget, (int, float)) or isinstance(budget, bool) or not budget > 0:
        return None
    if any(k in given for k in (*SHAPE_KEYS, "n_updates", "init_from")):
        return None
    device = given.get("device") or "auto"
    if not known_device(device) or resolve_preset(None, device) != "cpu":
        return None
    return given


def resumed(folder: str | Path, preset: str | None = None, config_path: str | None = None, **flags: Any) -> Settings:
    """A resume's settings: the run saved in `folder` < what the command gives (--preset < --config < flags < the time
    rule). A given setting equal to the saved one is fine; the RESUME_FIXED ones (shape, data) may not differ."""
    saved = load_train_state(folder, mmap=True).config  # train() reads the tensors; here only the config
    return on_saved(saved, folder, explicit_layers(preset, config_path, {k: v for k, v in flags.items() if k != "out"}))


def on_saved(saved: Any, out: str | Path, given: Sequence[Layer] = ()) -> Settings:
    """The settings a run saved (its config, a dict; old names read as new) under the given layers."""
    saved = renamed(saved) if isinstance(saved, dict) else saved
    if not isinstance(saved, dict) or set(saved) - set(TRAIN_FIELDS):
        raise ChargptError(f"the train state in {out} holds an unknown config; start a new run with --overwrite")
    values, sources = merge(given)
    for key in RESUME_FIXED:
        was = saved.get(key, TRAIN_FIELDS[key].default)  # a run saved before the field existed had its default
        if key in values and not _same_setting(key, values[key], was):
            raise ChargptError(
                f"{sources[key]} sets {key} = {shorten(values[key])} but the run in {out} has {shorten(was)}; "
                f"{key} cannot change on resume (fixed: {', '.join(RESUME_FIXED)}; n_updates, max_time, the "
                f"learning-rate schedule, eval and checkpoint intervals can); drop it, or start a new run with "
                f"--overwrite or another --out"
            )
    cfg = TrainConfig(**{**saved, **values, "out": str(out)})
    if cfg.n_updates is None and not cfg.max_time:
        raise ChargptError(
            f"max_time 0 (no time limit, from {sources.get('max_time', 'the saved run')}) leaves the run in {out} "
            f"with no budget: it has no step count (its clock was its budget, {shorten(saved.get('max_time'))} s); "
            f"give a larger --max-time (the run's total seconds) or an --n-updates"
        )
    cfg.validate()
    defaults = {k: f.default for k, f in TRAIN_FIELDS.items()}
    kept = {k: "the saved run" for k, v in saved.items() if k not in sources and v != defaults.get(k)}
    return Settings(cfg, {**kept, **sources})


def resume_config(folder: str | Path, **overrides: Any) -> TrainConfig:
    """The config of the run saved in `folder`, with any given settings on top (e.g. more n_updates): see resumed."""
    return resumed(folder, None, None, **overrides).config


def _same_setting(key: str, a: Any, b: Any) -> bool:
    if key in ("data", "init_from") and isinstance(a, str) and isinstance(b, str):
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def resolve_preset(preset: str | None, device: str) -> str:
    """The preset to use: the one named, else `cpu` on a CPU, `gpu` on CUDA, `seed` elsewhere (`auto` looks)."""
    if preset is None:
        if device == "auto":
            device = resolve_device(device).type  # torch is imported only here, when the device must be looked up
        return {"cpu": "cpu", "cuda": "gpu"}.get(device.split(":")[0], "seed")
    if preset not in PRESETS:
        raise ChargptError(f"unknown preset {shorten(preset)}; use one of {', '.join(PRESETS)}")
    return preset
