"""Averaged weights (`--ema`): an exponential moving average of the model's weights, updated after every step,
that each evaluation scores beside the weights as trained (on the same val batches); the better of the two is what
the run saves as its model, so sampling, eval, export, int8 and the server use it like any other. The average is
part of the resumable state. docs/design.md has the measurements behind the sized runs' 0.995.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Average:
    """The moving average of `model`'s parameters with decay `beta` per step (none before the first step, nor
    with beta 0)."""

    def __init__(self, beta: float, model: torch.nn.Module):
        self.beta = beta
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.weights: list[torch.Tensor] | None = None
        self.count = 0  # steps averaged into it

    @property
    def ready(self) -> bool:
        return self.weights is not None

    def describe(self) -> str:
        """What the averaged weights are, for config.json and `info`."""
        return f"an exponential moving average of the weights (decay {self.beta:g}, half-life {half_life(self.beta)})"

    @torch.no_grad()
    def update(self) -> None:
        """Average in the weights after a step (the first step's weights start the average)."""
        if not self.beta:
            return
        if self.weights is None:
            self.weights, self.count = [p.detach().clone() for p in self.params], 1
            return
        torch._foreach_lerp_(self.weights, [p.detach() for p in self.params], 1.0 - self.beta)
        self.count += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it (bit for bit)."""
        assert self.weights is not None
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, w in zip(self.params, self.weights, strict=True):
                p.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, trained, strict=True):
                    p.copy_(w)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The averaged weights by parameter name, on the CPU (for train_state.pt), or None."""
        if self.weights is None:
            return None
        return {name: w.detach().cpu() for name, w in zip(self.names, self.weights, strict=True)}

    def load(self, saved: dict[str, torch.Tensor] | None, count: int) -> None:
        """Restore a saved average (a run resumed with --ema 0 drops it; one resumed with another decay goes on
        from it at the new rate)."""
        if saved is None or not self.beta:
            self.weights, self.count = None, 0
            return
        if set(saved) != set(self.names):
            raise ValueError("its averaged weights do not match the model's parameters")
        weights = []
        for name, p in zip(self.names, self.params, strict=True):
            w = saved[name]
            if not isinstance(w, torch.Tensor) or w.shape != p.shape or w.dtype != p.dtype:
                raise ValueError(f"its averaged weight {name} does not match the model's")
            if not torch.isfinite(w).all():
                raise ValueError(f"its averaged weight {name} holds NaN or infinite values")
            weights.append(w.to(p.device).clone())
        self.weights, self.count = weights, count


def half_life(beta: float) -> str:
    """How many steps it takes the average to halve an old step's weight."""
    return f"{math.log(0.5) / math.log(beta):,.0f} steps" if 0 < beta < 1 else "-"
