"""Plain reference implementations the kernels are tested against: dequantise everything, then matmul.

Slow and memory-hungry on purpose (the whole dense weight is materialised); correctness only.
"""
from __future__ import annotations

import torch

from .quant import PackedWeight, unpack


def dequantize(pw: PackedWeight, rows: torch.Tensor | slice | None = None, dtype=torch.float32) -> torch.Tensor:
    """The dense weight [n, K] the packed codes stand for (the chosen rows, all by default); a
    `mixed.MixedWeight` (one PackedWeight per width) dequantises its parts."""
    if not isinstance(pw, PackedWeight):
        return pw.dequantize(dtype) if rows is None else pw.dequantize(dtype)[rows]
    q = unpack(pw, rows).to(torch.float32)
    scales = (pw.scales if rows is None else pw.scales[rows]).float()
    mins = (pw.mins if rows is None else pw.mins[rows]).float()
    lengths = torch.tensor([length for _, length in pw.group_bounds()])
    kp = pw.k_padded  # a known output size keeps this traceable by torch.compile (the compiled embedding lookup)
    w = (q * scales.repeat_interleave(lengths, dim=1, output_size=kp)
         + mins.repeat_interleave(lengths, dim=1, output_size=kp))
    return w[:, : pw.shape[1]].to(dtype)


def matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W_hat.T (+ bias), computed in float32, returned in x's dtype."""
    y = x.float() @ dequantize(pw).to(x.device).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
