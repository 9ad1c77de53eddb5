"""Triton dequantise-and-matmul for packed int4 and int8 weights (format: `gpu/quant.py`).

One program computes a BLOCK_M x BLOCK_N tile of y = x @ W_hat.T. It walks the K dimension one
quantisation group at a time: loads the group's packed bytes for BLOCK_N output rows, unpacks
them in registers (int4: low nibbles are the group's first half, high nibbles its second half,
so both halves are contiguous column ranges of x), applies the group's float16 scale and min,
and accumulates `tl.dot` in float32. The dense weight never exists in memory. A shorter last
group (K not divisible by the group size), and group sizes that are not powers of two, are
handled with masks (tile widths are powers of two, at least 32 so `tl.dot` has K >= 16).

Activations may be float16, bfloat16 or float32; the dot runs in the activation dtype (float32
dots use IEEE precision, not TF32) and accumulates in float32; y has x's dtype. (Under the
interpreter bfloat16 dots run in float32: see `_interpreting`.)

Tested on CPU tensors under TRITON_INTERPRET=1 (exact semantics, slow). Roofline estimate for an
H100: docs/kernels.md.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .quant import PackedWeight


@triton.jit
def _qmm_kernel(x_ptr, p_ptr, s_ptr, m_ptr, y_ptr, M, N, K, n_groups,
                stride_xm, stride_pn, stride_sn, stride_ym,
                BITS: tl.constexpr, GS: tl.constexpr, GP2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_pad = (K + 7) // 8 * 8
    for g in range(0, n_groups):
        base = g * GS
        length = tl.minimum(GS, k_pad - base)
        scale = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        low = tl.load(m_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        if BITS == 8:
            j = tl.arange(0, GP2)
            j_ok = j < length
            k = base + j
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :],
                         mask=m_ok[:, None] & (j_ok & (k < K))[None, :], other=0.0)
            q = tl.load(p_ptr + rn[None, :] * stride_pn + k[:, None], mask=j_ok[:, None] & n_ok[None, :], other=0)
            w = q.to(tl.float32) * scale[None, :] + low[None, :]
            if UPCAST:
                acc += tl.dot(xt.to(tl.float32), w, input_precision="ieee")
            elif IEEE:
                acc += tl.dot(xt, w, input_precision="ieee")
            else:
                acc += tl.dot(xt, w.to(xt.dtype))
        else:  # 4 bits
            half = length // 2
            j = tl.arange(0, GP2 // 2)
            j_ok = j < half
            b = tl.load(p_ptr + rn[None, :] * stride_pn + (base // 2 + j)[:, None],
                        mask=j_ok[:, None] & n_ok[None, :], other=0).to(tl.int32)
            k_lo = base + j
            k_hi = base + half + j
            x_lo = tl.load(x_ptr + rm[:, None] * stride_xm + k_lo[None, :],
                           mask=m_ok[:, None] & (j_ok & (k_lo < K))[None, :], other=0.0)
            x_hi = tl.load(x_ptr + rm[:, None] * stride_xm + k_hi[None, :],
                           mask=m_ok[:, None] & (j_ok & (k_hi < K))[None, :], other=0.0)
            w_lo = (b & 15).to(tl.float32) * scale[None, :] + low[None, :]
            w_hi = (b >> 4).to(tl.float32) * scale[None, :] + low[None, :]
            if UPCAST:
                acc += tl.dot(x_lo.to(tl.float32), w_lo, input_precision="ieee")
                acc += tl.dot(x_hi.to(tl.float32), w_hi, input_precision="ieee")
            elif IEEE:
                acc += tl.dot(x_lo, w_lo, input_precision="ieee")
                acc += tl.dot(x_hi, w_hi, input_precision="ieee")
            else:
                acc += tl.dot(x_lo, w_lo.to(x_lo.dtype))
                acc += tl.dot(x_hi, w_hi.to(x_hi.dtype))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _interpreting() -> bool:
    """Triton's CPU interpreter computes bfloat16 `tl.dot` wrongly (it has no numpy bfloat16), so
    under TRITON_INTERPRET=1 bfloat16 tiles are upcast to float32 before the dot."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
           block_m: int | None = None, block_n: int = 64) -> torch.Tensor:
    """x [..., K] @ W_hat.T (+ bias) with the Triton kernel; int4 and int8 only."""
    if pw.bits not in (4, 8):
        raise ValueError(f"the Triton kernel runs int4 and int8, not int{pw.bits}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, (n, k) = x2.shape[0], pw.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if block_m is None:
        block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _qmm_kernel[grid](x2, pw.packed, pw.scales, pw.mins, y, m, n, k, pw.n_groups,
                      x2.stride(0), pw.packed.stride(0), pw.scales.stride(0), y.stride(0),
                      BITS=pw.bits, GS=pw.group_size, GP2=max(32, triton.next_power_of_2(pw.group_size)),
                      BLOCK_M=block_m, BLOCK_N=block_n,
                      IEEE=x.dtype == torch.float32, UPCAST=x.dtype == torch.bfloat16 and _interpreting())
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)
