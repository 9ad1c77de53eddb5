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

KV_BITS = (2, 4, 8)


class Packed(NamedTuple):
    """Codes [..., g*bits/8] (uint8) with their float16 scale and min [...]."""

    codes: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor
    bits: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.min))


def quantize(x: torch.Tensor, bits: int) -> Packed:
    """x [..., g] quantised in groups of its last axis (g divisible by 8 // bits)."""
    if bits not in KV_BITS:
        raise ValueError(f"KV bits must be one of {KV_BITS}, not {bits!r}")
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)
    qmax = (1 << bits) - 1
    s16 = ((hi - lo) / qmax).clamp_min(1e-7).to(torch.float16)
    m16 = lo.to(torch.float16)
    q = torch.round((xf - m16.float()[..., None]) / s16.float()[..., None]).clamp_(0, qmax).to(torch.uint8)
    return Packed(_pack(q, bits), s16, m16, bits)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.contiguous()
    per = 8 // bits
    parts = q.unflatten(-1, (per, -1))
    word = parts[..., 0, :].clone()
    for t in range(1, per):
        word |= parts[..., t, :] << (bits * t)
    return word


def codes(p: Packed) -> torch.Tensor:
    """The integer codes [..., g] (uint8) of a packed tensor."""
    if p.bits == 8:
        return p.codes
    mask = (1 << p.bits) - 1
    return torch.cat([(p.codes >> (p.bits * t)) & mask for t in range(8 // p.bits)], dim=-1)


def dequantize(p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values [..., g] a packed tensor stands for."""
    return torch.addcmul(p.min.to(dtype)[..., None], codes(p).to(dtype), p.scale.to(dtype)[..., None])


def cat(parts: list[Packed], dim: int) -> Packed:
    """Packed tensors joined along a leading axis `dim` (< the codes' last)."""
    return Packed(*(torch.cat([getattr(p, f) for p in parts], dim=dim) for f in ("codes", "scale", "min")),
                  parts[0].bits)


def narrow(p: Packed, dim: int, start: int) -> Packed:
    """The entries of a leading axis `dim` from `start` on."""
    return Packed(*(getattr(p, f).narrow(dim, start, getattr(p, f).shape[dim] - start).contiguous()
                    for f in ("codes", "scale", "min")), p.bits)
