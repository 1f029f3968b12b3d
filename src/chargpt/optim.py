"""Optimisation: AdamW with decay on weight matrices only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from chargpt.config import TrainConfig


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


def learning_rate(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio that ends with n_updates or max_time, whichever first."""
    if step < cfg.warmup_updates:
        return cfg.learning_rate * (step + 1) / cfg.warmup_updates
    progress = step / cfg.n_updates
    if cfg.max_time > 0:
        progress = max(progress, elapsed / cfg.max_time)
    progress = min(1.0, progress)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + (cfg.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
