"""The int8 Linear layer: weights as int8 rows times a bf16 scale per row, multiplied by torch's int8 kernel on
bf16 activations. A leaf: it imports nothing of chargpt, so the one-token step (decode) and the quantizer
(quantize, which makes a model's int8 copy and decides when to use it) both build on it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SMALL_ROWS = 16  # up to this many rows the int8 kernel runs; a batch of more is a matmul: dequantize to bf16 once
ALIGN = 32  # the kernel reads the inner dimension in blocks: other widths gave wrong sums (zero-padded to this)


class Int8Linear(nn.Module):
    """nn.Linear with its weight stored as int8 rows times a bf16 scale per row (symmetric, absmax / 127); the
    rows zero-padded to a multiple of ALIGN columns."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scales = (w.abs().amax(1) / 127).clamp(min=1e-30).to(torch.bfloat16)  # the kernel multiplies by bf16 scales
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        q = F.pad(q, (0, -q.size(1) % ALIGN))  # (out, in rounded up)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._dequantized: torch.Tensor | None = None  # bf16 (out, in), made at the first batch of many rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in fp32. A few rows run the int8 kernel; a batch of many rows (a prefill, an
        evaluation) is a matrix product, for which the weight is dequantized to bf16 once per call."""
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.size(0) <= SMALL_ROWS:
            y = int8_linear(rows, self.qweight, self.scales, self.bias)
        else:
            if self._dequantized is None:  # kept: a sampler past the window runs a full forward per token
                self._dequantized = self.qweight[:, : self.in_features].to(torch.bfloat16) * self.scales[:, None]
            y = F.linear(rows, self._dequantized)
            y = y.float() if self.bias is None else torch.add(self.bias, y)  # fp32 (type promotion: one pass)
        return y.view(*x.shape[:-1], self.out_features)


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x (M, in) -> (M, out) fp32: the int8 kernel on bf16 activations (zero-padded as the weight is), then the
    fp32 bias. out=torch.bfloat16: without a bias, the kernel's bf16 output as it is (with one, still fp32)."""
    x = x.to(torch.bfloat16)
    if x.size(1) != qweight.size(1):
        x = F.pad(x, (0, qweight.size(1) - x.size(1)))
    y = torch._weight_int8pack_mm(x, qweight, scales)  # bf16
    if out == torch.bfloat16 and bias is None:
        return y
    return y.float() if bias is None else torch.add(bias, y)  # fp32 (type promotion: one pass)
