"""Decode attention read straight from a packed KV cache (`gpu.kvquant`), without dequantising it.

For a token t stored per token as codes c_t with scale s_t and min m_t (one group per head), the key is
s_t c_t + m_t, so

    q . k_t = s_t (q . c_t) + m_t sum(q),        sum_t p_t v_t = (p * s) @ c + (p . m),

and for KIVI's per-channel keys (block b of tokens, one scale and min per channel d)

    q . k_t = (q * s_b) . c_t + q . m_b.

So attention needs only the codes as floats, one bit-plane and one chunk of tokens at a time (planes are
contiguous slices of head_dim for per-token states, of the block's tokens for per-channel keys): a chunk of
2048 tokens stays in cache while a matrix product reads it, and the float copy of the whole cache that
dequantising would write is never made. Everything here is plain torch, on any device.

Shapes: queries are grouped by KV head, q [B, H_kv, R, D] (R = query heads per KV head x query tokens);
per-token packed states have codes [B, H_kv, T, D*bits/8] and scale/min [B, H_kv, T]; per-channel keys have
codes [B, H_kv, T/G, D, G*bits/8] and scale/min [B, H_kv, T/G, D].
"""
from __future__ import annotations

import torch

from .kvquant import Packed

CHUNK = 2048  # tokens per step: the float codes of one chunk and plane stay in cache


def _planes(codes: torch.Tensor, bits: int, dtype: torch.dtype) -> list[torch.Tensor]:
    if bits == 8:
        return [codes.to(dtype)]
    mask = (1 << bits) - 1
    return [((codes >> (bits * t)) & mask).to(dtype) for t in range(8 // bits)]


def scores(q: torch.Tensor, p: Packed, per_channel: int = 0) -> torch.Tensor:
    """q . k for every stored key: [B, H_kv, R, T]."""
    if per_channel:
        return _scores_channel(q, p, per_channel)
    D = q.shape[-1]
    width = D * p.bits // 8
    qs = q.sum(-1, keepdim=True)
    out = []
    for c0 in range(0, p.codes.shape[2], CHUNK):
        planes = _planes(p.codes[:, :, c0:c0 + CHUNK], p.bits, q.dtype)
        step = width if p.bits == 8 else D // len(planes)
        dot = None
        for t, plane in enumerate(planes):
            part = q[..., t * step:(t + 1) * step] @ plane.transpose(-1, -2)
            dot = part if dot is None else dot.add_(part)
        s = p.scale[:, :, None, c0:c0 + CHUNK].to(q.dtype)
        m = p.min[:, :, None, c0:c0 + CHUNK].to(q.dtype)
        out.append(dot.mul_(s).addcmul_(qs, m))
    return torch.cat(out, -1)


def _scores_channel(q: torch.Tensor, p: Packed, group: int) -> torch.Tensor:
    B, H, R, D = q.shape
    out = []
    blocks = max(1, CHUNK // group)
    for b0 in range(0, p.codes.shape[2], blocks):
        s = p.scale[:, :, b0:b0 + blocks].to(q.dtype)  # [B, H, n, D]
        m = p.min[:, :, b0:b0 + blocks].to(q.dtype)
        qs = q[:, :, None] * s[:, :, :, None]  # [B, H, n, R, D]
        planes = _planes(p.codes[:, :, b0:b0 + blocks], p.bits, q.dtype)  # each [B, H, n, D, G/per]
        dot = torch.cat([qs @ plane for plane in planes], -1)  # [B, H, n, R, G] in token order
        dot += (q[:, :, None] @ m[..., None])  # q . m_b, [B, H, n, R, 1]
        out.append(dot.permute(0, 1, 3, 2, 4).flatten(3))
    return torch.cat(out, -1)


def weighted(w: torch.Tensor, p: Packed) -> torch.Tensor:
    """sum_t w_t v_t for per-token packed values: w [B, H_kv, R, T] -> [B, H_kv, R, D]."""
    out = None
    for c0 in range(0, p.codes.shape[2], CHUNK):
        wc = w[..., c0:c0 + CHUNK]
        ws = wc * p.scale[:, :, None, c0:c0 + CHUNK].to(w.dtype)
        base = (wc * p.min[:, :, None, c0:c0 + CHUNK].to(w.dtype)).sum(-1, keepdim=True)
        part = torch.cat([ws @ plane for plane in _planes(p.codes[:, :, c0:c0 + CHUNK], p.bits, w.dtype)], -1)
        part += base
        out = part if out is None else out.add_(part)
    return out
