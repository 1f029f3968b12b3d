"""Optimisation: AdamW (weight decay on weight matrices only) or Muon for the hidden matrices with AdamW for the
rest, and the learning-rate schedules: warm-up, then cosine decay or warmup-stable-decay (WSD)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from chargpt.config import TrainConfig
from chargpt.errors import ctrl_c_held
from chargpt.machine.precision import cpu_info

Anchor = tuple[int, float, float]  # (step, elapsed seconds, learning rate) where an extended schedule restarts
# what a resumed run may change about its schedule: the budget (the first two) and the schedule's shape
SCHEDULE_KEYS = (
    *("n_updates", "max_time"),
    *("learning_rate", "min_lr_ratio", "warmup_updates", "schedule", "decay_fraction"),
)
# Newton-Schulz quintic coefficients (Keller Jordan's Muon): five iterations take a matrix's singular values
# to roughly [0.7, 1.2], which is as orthogonal as the update needs to be
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MUON_MOMENTUM = 0.95


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizer:
    """AdamW with weight decay on weight matrices only (not on biases, LayerNorm gains); or, with optimizer
    muon, Muon for the transformer blocks' matrices and that AdamW for the embeddings, head, biases and gains."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [(n, p) for n, p in named if cfg.optimizer == "muon" and n.startswith("blocks.") and p.dim() == 2]
    in_muon = {id(p) for _, p in hidden}
    stacked = model.stacked() if hasattr(model, "stacked") else {}  # the GPT's fused Q, K, V weights
    rest = [p for _, p in named if id(p) not in in_muon]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device.type in ("cuda", "cpu")
    with ctrl_c_held():  # torch.optim's first call imports torch._dynamo (~1.5 s): a Ctrl-C there waits for it
        adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=fused)
    if not hidden:
        return adamw
    muon = Muon(
        [{"params": [p for _, p in hidden if stacked.get(p) == 3], "split": 3},  # Q, K, V apart
         {"params": [p for _, p in hidden if stacked.get(p, 1) == 1], "split": 1}],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        ns_dtype=ns_dtype(device),
    )  # fmt: skip
    return Pair(muon, adamw)


def ns_dtype(device: torch.device) -> torch.dtype:
    """Muon's orthogonalisation runs in bf16 where matmuls in it are native (a GPU, a CPU with bf16 instructions),
    else fp32: emulated bf16 would cost more than the rest of the step."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_info().native_bf16 else torch.float32
    return torch.float32


def orthogonalize(g: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each g[i] (a batch of matrices), approximately, by Newton-Schulz."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon: SGD momentum (Nesterov) whose update is orthogonalised, for 2-D hidden matrices.

    The update of a (rows x cols) matrix is scaled by 0.2 * sqrt(max(rows, cols)) so that its size matches an
    AdamW update's (Moonshot's rule): one learning rate serves both optimizers. A group's `split` orthogonalises
    that many equal row blocks apart (the fused query, key and value projections are three matrices)."""

    def __init__(self, params: Iterable[Any], lr: float, weight_decay: float, ns_dtype: torch.dtype):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "split": 1, "momentum": MUON_MOMENTUM})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - the Optimizer signature
        for group in self.param_groups:
            lr, decay, k, mu = group["lr"], group["weight_decay"], group["split"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                g = p.grad.lerp(buf, mu)  # Nesterov
                rows, cols = p.size(0) // k, p.size(1)
                update = orthogonalize(g.view(k, rows, cols), self.ns_dtype).view_as(p)
                p.mul_(1 - lr * decay)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))


class Pair:
    """Muon and AdamW stepped together as one optimizer (the loop sets the learning rate of every group)."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("not a Muon + AdamW state (the run was saved with another --optimizer)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


Optimizer = torch.optim.Optimizer | Pair


def learning_rate(cfg: TrainConfig, step: int, elapsed: float, anchor: Anchor | None = None) -> float:
    """Linear warm-up, then a decay to learning_rate x min_lr_ratio that ends with n_updates or max_time,
    whichever comes first: cosine over the whole budget, or (wsd) flat until the last decay_fraction of the
    budget and linear down from there.

    anchor: where a resumed run's budget was extended after its learning rate had decayed (step, elapsed, the
    learning rate there): from that point the rate climbs back to its peak over a short ramp (warmup_updates
    steps) and the schedule runs again over what is left of the new budget."""
    if step < cfg.warmup_updates:
        return cfg.learning_rate * (step + 1) / cfg.warmup_updates
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if anchor is not None:
        start_step, _, reached = anchor
        ramp = max(cfg.warmup_updates, 1)
        if step < start_step + ramp and reached < peak:
            return reached + (peak - reached) * (step - start_step + 1) / ramp
    progress = schedule_progress(cfg, step, elapsed, anchor)
    if cfg.schedule == "wsd":
        left = 1.0 - progress
        return floor + (peak - floor) * min(1.0, left / cfg.decay_fraction) if cfg.decay_fraction else peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_progress(cfg: TrainConfig, step: int, elapsed: float, anchor: Anchor | None = None) -> float:
    """How far the schedule is, 0..1: by steps or by time, whichever is further; from the anchor, if any."""
    start_step, start_time = (0, 0.0) if anchor is None else anchor[:2]
    progress = (step - start_step) / max(cfg.step_limit - start_step, 1)
    if cfg.max_time > 0:
        progress = max(progress, (elapsed - start_time) / max(cfg.max_time - start_time, 1e-9))
    return min(1.0, max(progress, 0.0))


def in_final_decay(cfg: TrainConfig, step: int, elapsed: float, anchor: Anchor | None = None) -> bool:
    """Whether a WSD schedule has left its flat stretch (its weights from before this point are the ones a
    longer budget continues from)."""
    if cfg.schedule != "wsd" or step < cfg.warmup_updates:
        return False
    return schedule_progress(cfg, step, elapsed, anchor) > 1.0 - cfg.decay_fraction


def same_schedule(old: TrainConfig, new: TrainConfig) -> bool:
    """Whether a resume keeps the schedule's shape (rate, floor, warm-up, kind, decay length): only its budget
    differs."""
    return all(getattr(old, k) == getattr(new, k) for k in SCHEDULE_KEYS[2:])


def budget_grew(old: TrainConfig, new: TrainConfig) -> bool:
    """A resume that asks for more: more steps or more time, and no less of either."""
    unlimited = math.inf  # max_time 0: no time budget
    old_time, new_time = old.max_time or unlimited, new.max_time or unlimited
    old_steps, new_steps = old.step_limit, new.step_limit
    more = new_steps > old_steps or new_time > old_time
    return more and new_steps >= old_steps and new_time >= old_time


def extended_anchor(
    old: TrainConfig, new: TrainConfig, step: int, elapsed: float, anchor: Anchor | None
) -> Anchor | None:
    """The anchor of a resumed run. Its budget unchanged: the saved one. A new schedule shape asked for, a run
    still warming up, or one still at its peak rate (WSD's flat stretch): none, the schedule simply follows the
    new budget. A run whose rate had decayed: a new anchor there, from which the rate climbs back to its peak."""
    same_shape = same_schedule(old, new)
    budget_changed = (old.n_updates, old.max_time) != (new.n_updates, new.max_time)
    if not budget_changed:
        return anchor
    if not same_shape or step < old.warmup_updates:
        return None
    reached = learning_rate(old, step, elapsed, anchor)
    if reached >= old.learning_rate:
        return anchor
    return (step, elapsed, reached)


def set_learning_rate(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
