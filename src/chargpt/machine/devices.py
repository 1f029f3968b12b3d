"""Device names: the ones chargpt knows, and the device a name means on this machine. Checking a name needs no
torch (configs are built before torch is imported); resolving it does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chargpt.config import check_device
from chargpt.errors import ChargptError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` -> a device that exists here, else a one-line error."""
    import torch  # only when a device is looked up: the command line checks device names without torch

    check_device(name)
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        return torch.device("mps") if mps else torch.device("cpu")
    if name == "mps" and not mps:
        raise ChargptError("--device mps was asked for but this machine has no MPS (Apple GPU); use --device cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ChargptError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    if name.startswith("cuda:") and int(name.removeprefix("cuda:")) >= torch.cuda.device_count():
        raise ChargptError(
            f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0; pick one of them"
        )
    return torch.device(name)
