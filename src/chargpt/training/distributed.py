"""Devices and processes: which device a run uses, and how ranks under torchrun agree.

Owns device resolution (`auto` -> cuda > mps > cpu), the `Dist` description of this process,
joining and leaving the process group, and the few collectives the training loop needs. A single
process (no torchrun) is the world of one: every collective is then the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from chargpt.config import TrainConfig
from chargpt.errors import ChargptError
from chargpt.machine.devices import resolve_device


@dataclass
class Dist:
    """This process's place in the run: rank, world size and device."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    owns_group: bool = False  # train() joined the process group, so train() leaves it at the end
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this rank's device

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_batch(cfg: TrainConfig, world: int) -> int:
    """The rows each rank feeds per micro-batch: batch_size is global, split over ranks, then micro-batches."""
    per_micro, rem = divmod(cfg.batch_size, world * cfg.gradient_accumulation_steps)
    if rem or per_micro == 0:
        raise ChargptError(
            f"batch_size {cfg.batch_size} must divide by world size {world} x gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps}; pick a batch_size that is a multiple of "
            f"{world * cfg.gradient_accumulation_steps}"
        )
    return per_micro


def init_distributed(cfg: TrainConfig) -> Dist:
    """Join the process group torchrun set up, or run alone if there is none. Checks before it joins."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if env["WORLD_SIZE"] is None and env["RANK"] is None:
        check_batch(cfg, 1)
        return Dist(device=resolve_device(cfg.device))
    missing = [k for k, v in env.items() if v is None]
    if missing:
        raise ChargptError(
            f"broken distributed launch: {', '.join(missing)} not set; launch with torchrun "
            f"(e.g. torchrun --nproc_per_node=2 -m chargpt train ...) or unset WORLD_SIZE/RANK"
        )
    try:
        d = Dist(rank=int(env["RANK"]), local_rank=int(env["LOCAL_RANK"]), world=int(env["WORLD_SIZE"]))
    except ValueError:
        raise ChargptError("broken distributed launch: RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None
    if not 0 <= d.rank < d.world:
        raise ChargptError(f"broken distributed launch: RANK={d.rank} is outside WORLD_SIZE={d.world}")
    check_batch(cfg, d.world)
    d.device = device = resolve_device(cfg.device, d.local_rank)
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ChargptError(
                f"LOCAL_RANK {d.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                f"launch at most that many processes per node (--nproc_per_node / --nproc)"
            )
        torch.cuda.set_device(device)
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=d.rank, world_size=d.world)
        d.owns_group = True
    return d


def finish_distributed(d: Dist) -> None:
    """Every rank waits for rank 0's writes, then the group train() joined is left (so it can train again)."""
    if d.world > 1:
        dist.barrier()
    if d.owns_group:
        dist.destroy_process_group()


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of loss sums kept on `device`: float64, except on MPS, which has no float64 (a float64 tensor
    there is an error, at the first training step)."""
    return torch.float32 if device.type == "mps" else torch.float64


def rank_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's contiguous share of a global batch (every rank drew the same global batch)."""
    rows = x.size(0) // d.world
    return x[d.rank * rows : (d.rank + 1) * rows]


def all_max(values: list[float], d: Dist) -> list[float]:
    """Element-wise maximum over ranks (one all-reduce for several values)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=sum_dtype(d.device), device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_mean(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=sum_dtype(d.device), device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / d.world


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch onto the device without making the host wait (pinned memory: a truly asynchronous copy)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
