"""The packed format of a quantised KV cache: asymmetric min-max groups along the last axis.

A tensor x [..., g] is quantised group-wise over its last axis (KIVI, arXiv 2402.02750; KVTuner,
arXiv 2502.04420):

    scale = (max - min) / (2^bits - 1),   q = clamp(round((x - min) / scale), 0, 2^bits - 1),
    x_hat = q * scale + min

with `scale` and `min` stored as float16, one pair per group. Codes are packed byte-planar within
the group, like the weights of `gpu.quant`: 8 bits one per byte; 4 bits byte j holds q[j] (low
nibble) and q[j + g/2]; 2 bits byte j holds q[j + t*g/4] in bits 2t..2t+1. So a group of g values
takes g * bits / 8 bytes plus 4.

Per-token caches group each token's head_dim values (x = keys [B, H, T, D]); KIVI's per-channel
keys group the same channel over a block of tokens (x = keys viewed [B, H, T/G, D, G]).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .quant import dequantized, grid, pack_planes, round_to_grid

KV_BITS = (2, 4, 8)


class Packed(NamedTuple):
    """Codes [..., g*bits/8] (uint8) with their float16 scale and min [...]."""

    codes: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor
    bits: int


def quantize(x: torch.Tensor, bits: int) -> Packed:
    """x [..., g] quantised in groups of its last axis (g divisible by 8 // bits), on the weights' min-max grid
    (`gpu.quant.grid`) and packed as their byte planes."""
    if bits not in KV_BITS:
        raise ValueError(f"KV bits must be one of {KV_BITS}, not {bits!r}")
    lead, g = x.shape[:-1], x.shape[-1]
    x2 = x.float().reshape(-1, g)
    s16, m16 = grid(x2, bits)
    q = round_to_grid(x2, s16, m16, bits).to(torch.uint8)
    return Packed(pack_planes(q[:, None, :], bits)[:, 0].reshape(*lead, -1), s16.reshape(lead), m16.reshape(lead),
                  bits)


def codes(p: Packed) -> torch.Tensor:
    """The integer codes [..., g] (uint8) of a packed tensor."""
    if p.bits == 8:
        return p.codes
    mask = (1 << p.bits) - 1
    return torch.cat([(p.codes >> (p.bits * t)) & mask for t in range(8 // p.bits)], dim=-1)


def dequantize(p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values [..., g] a packed tensor stands for."""
    c = codes(p)
    return dequantized(c.reshape(-1, c.shape[-1]).to(dtype), p.scale.reshape(-1), p.min.reshape(-1)).to(
        dtype).reshape(c.shape)
