"""Dropout for CPU training with cheaper random masks than torch's (the model's residual and attention dropout)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask of the elements to drop, each with probability p (to 1/65536), and the keep-scale.

    On CPU, torch's bernoulli_ draws one Mersenne-Twister number per element and costs a quarter of a
    training step at dropout 0.2; here one 64-bit draw yields four 16-bit uniforms, about 6x cheaper.
    """
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    uniform16 = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    k = min(round(p * 65536), 65535)  # p just below 1 still keeps 1 element in 65536 (and a finite scale)
    return uniform16 < k - 32768, 65536 / (65536 - k)


class Dropout(nn.Module):
    """nn.Dropout, with cheaper random masks on CPU (see dropout_mask); same semantics."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        drop, scale = dropout_mask(tuple(x.shape), self.p, x.device)
        return torch.where(drop, 0.0, x * scale)  # one pass each way (masked_fill would clone, then fill)
