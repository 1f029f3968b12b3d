"""Optimisation: AdamW with decay on weight matrices only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from chargpt.config import TrainConfig

Anchor = tuple[int, float, float]  # (step, elapsed seconds, learning rate) where an extended schedule restarts
SCHEDULE_KEYS = ("n_updates", "max_time", "learning_rate", "min_lr_ratio", "warmup_updates")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases, LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=fused)


def learning_rate(cfg: TrainConfig, step: int, elapsed: float, anchor: Anchor | None = None) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio that ends with n_updates or max_time, whichever first.

    anchor: where a resumed run's budget was extended (step, elapsed, the learning rate there): from that point
    the cosine starts again at that learning rate and decays over what is left of the new budget, so extending
    a run continues smoothly instead of jumping back up the stretched curve."""
    if step < cfg.warmup_updates:
        return cfg.learning_rate * (step + 1) / cfg.warmup_updates
    start_step, start_time, peak = (0, 0.0, cfg.learning_rate) if anchor is None else anchor
    progress = (step - start_step) / max(cfg.n_updates - start_step, 1)
    if cfg.max_time > 0:
        progress = max(progress, (elapsed - start_time) / max(cfg.max_time - start_time, 1e-9))
    progress = min(1.0, max(progress, 0.0))
    floor = cfg.learning_rate * cfg.min_lr_ratio
    peak = max(peak, floor)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def extended_anchor(
    old: TrainConfig, new: TrainConfig, step: int, elapsed: float, anchor: Anchor | None
) -> Anchor | None:
    """The anchor of a resumed run: a new one where only its budget (n_updates, max_time) changed after warm-up,
    at the learning rate the old schedule had reached; else the saved one (None for a fresh schedule)."""
    same_shape = all(getattr(old, k) == getattr(new, k) for k in ("learning_rate", "min_lr_ratio", "warmup_updates"))
    budget_changed = (old.n_updates, old.max_time) != (new.n_updates, new.max_time)
    if not budget_changed:
        return anchor
    if not same_shape or step < old.warmup_updates:
        return None  # a new schedule asked for, or still warming up: the schedule simply follows the new budget
    return (step, elapsed, learning_rate(old, step, elapsed, anchor))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
