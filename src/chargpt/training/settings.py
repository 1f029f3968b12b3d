"""The settings of a new run, resolved in one order: defaults < preset < the sized shape < TOML < flags, then a
fine-tune's source model (its shape, gentler defaults). chargpt.config holds the settings themselves; this
resolution may read a model folder (a fine-tune's source), which the config layer never does."""

from __future__ import annotations

from typing import Any

from chargpt.config import (
    PRESETS,
    TIME_GOVERNED_UPDATES,
    TRAIN_FIELDS,
    TrainConfig,
    _renamed,
    check_device,
    load_toml,
    resolve_preset,
)
from chargpt.errors import ChargptError
from chargpt.training.finetune import fill_config


def make_train_config(
    preset: str | None = None, config_path: str | None = None, sized: dict[str, Any] | None = None, **overrides: Any
) -> TrainConfig:
    """What the CLI does: defaults < preset (auto: 'cpu' on CPU, 'seed' elsewhere) < sized < TOML < overrides.
    sized: the settings chargpt.training.sizing chose for the budget (on top of the preset)."""
    toml = load_toml(config_path) if config_path else {}
    overrides = _renamed(overrides)
    unknown = sorted(set(overrides) - set(TRAIN_FIELDS))
    if unknown:
        raise ChargptError(f"unknown training option(s): {', '.join(unknown)}")
    device = overrides.get("device") or toml.get("device") or "auto"
    check_device(device)
    preset = resolve_preset(preset, device)
    given = {**toml, **{k: v for k, v in overrides.items() if v is not None}}
    if given.get("max_time") and "n_updates" not in given:
        # a time budget alone governs the run: no preset step count may end it (and its schedule) early
        overrides = {**overrides, "n_updates": TIME_GOVERNED_UPDATES}
    return build_train_config(preset, {**(sized or {}), **toml}, overrides)


def build_train_config(
    preset: str, toml: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Layer defaults < preset < TOML < overrides into a validated TrainConfig."""
    values: dict[str, Any] = dict(PRESETS[preset])
    given = {**(toml or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    values.update(given)
    if values.get("init_from") is not None:  # a fine-tune: the shape is the model's, the defaults gentler
        values.setdefault("learning_rate", TRAIN_FIELDS["learning_rate"].default)
        fill_config(values, given)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
