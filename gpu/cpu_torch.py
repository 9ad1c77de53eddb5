"""Decode on the CPU through torch's own weight-only kernels, for the packed weights they can hold
exactly (same codes, same grid), where they beat `cpu_kernels`:

* int4, groups the kernel tiles: `torch._weight_int4pack_mm_for_cpu` (the tinygemm-style kernel torchao's
  CPU int4 path also ran). It dequantises `(q - 8) * scale + zero` per group; the packed format's
  `q * scale + min` is that grid with `zero = min + 8 * scale`. The codes are re-laid into torch's
  blocked layout once per weight, and the scales repeated onto a group size the kernel takes (32, 64,
  128 or 256: SmolLM2's K = 576 in groups of 128 ends with a group of 64, so its groups of 128 run as
  pairs of 64 sharing one scale).
* int8, symmetric, one group per row (`--scheme sym --group-size -1`): `torch._weight_int8pack_mm`,
  per-row scales on signed codes; the format stores code q + 128 with min = -128 * scale, so the signed
  codes are the stored bytes minus 128. The kernel reads K in steps of 32 (other K crash it), so the
  codes are padded with zeros to a multiple of 32.

Both kernels are vectorised for bfloat16 activations only (float32 ones run a scalar loop many times
slower), so activations and scales are rounded to bfloat16 (8 significant bits): outputs differ from the
exact float32 kernels by up to 1e-2 of their largest value (what the tests allow).
`cpu_kernels.set_exact(True)` (or LENSBENCH_EXACT_KERNELS=1) keeps every matmul on the exact kernels.
The converted weight is kept on its PackedWeight (made on the first decode step), next to the packed
bytes that export, prefill and the other kernels read.
"""
from __future__ import annotations

import math

import torch

from .quant import PackedWeight, unpack

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 kernel takes
ROW_MULTIPLE = 16  # its converter needs N % 16 == 0
INT8_K_MULTIPLE = 32  # torch's int8 kernel crashes (SIGSEGV) on other K
CHUNK = 4096  # rows converted at a time: the layout is blocked by rows, so chunks concatenate


def int4_group(pw: PackedWeight) -> int | None:
    """The int4 kernel's group size that tiles every group of `pw` (its last, shorter one too), or None."""
    if pw.bits != 4 or pw.shape[0] % ROW_MULTIPLE:
        return None
    g = math.gcd(*(length for _, length in pw.group_bounds()), 256)
    return g if g in INT4_GROUPS else None


def int8_rows(pw: PackedWeight) -> bool:
    """Whether `pw` is int8 on the symmetric grid with one group per row (what `_weight_int8pack_mm` runs)."""
    return (pw.bits == 8 and pw.n_groups == 1
            and torch.equal(pw.mins.float(), -128 * pw.scales.float()))


def supported(pw: PackedWeight) -> bool:
    """Whether a torch kernel runs `pw` (answered once per weight: this sits on the decode hot path)."""
    ok = pw.__dict__.get("_torch_ok")
    if ok is None:  # a `lean` weight (`compress.apply.convert`) keeps no second copy of its codes
        ok = pw.__dict__["_torch_ok"] = not pw.__dict__.get("lean") and (int4_group(pw) is not None or int8_rows(pw))
    return ok


def layout(pw: PackedWeight) -> tuple:
    """The weight as its torch kernel takes it, made once and kept on `pw`: (K the kernel reads, then for
    int4: codes [N, K/2] uint8 in torch's layout, group size, scales and zeros [K/g, N, 2] bfloat16; for
    int8: codes [N, K] int8, scales [N] bfloat16)."""
    got = pw.__dict__.get("_torch_layout")
    if got is None:
        if not supported(pw):
            raise ValueError(f"{pw!r} has no torch kernel: int4 needs N % {ROW_MULTIPLE} == 0 and groups tiled by "
                             f"one of {INT4_GROUPS}; int8 needs --scheme sym with one group per row")
        if pw.bits == 8:
            k = -(-pw.k_padded // INT8_K_MULTIPLE) * INT8_K_MULTIPLE
            codes = torch.nn.functional.pad(pw.packed.to(torch.int16) - 128, (0, k - pw.k_padded))
            got = (k, codes.to(torch.int8).contiguous(), pw.scales[:, 0].to(torch.bfloat16))
        else:
            g = int4_group(pw)
            rows = range(0, pw.shape[0], CHUNK)
            packed = torch.cat([torch._convert_weight_to_int4pack_for_cpu(
                unpack(pw, slice(r, r + CHUNK)).to(torch.int32), 1) for r in rows])
            reps = torch.tensor([length // g for _, length in pw.group_bounds()])
            s = pw.scales.float().repeat_interleave(reps, dim=1)
            zero = pw.mins.float().repeat_interleave(reps, dim=1) + 8 * s
            got = (pw.k_padded, packed, g, torch.stack([s.T, zero.T], dim=-1).to(torch.bfloat16).contiguous())
        pw.__dict__["_torch_layout"] = got
    return got


def matmul(x2: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """x2 [M, K] float -> [M, N] float32 on torch's kernel for `pw` (bfloat16 activations)."""
    k, *w = layout(pw)
    xb = x2.to(torch.bfloat16)
    if k != xb.shape[1]:
        xb = torch.nn.functional.pad(xb, (0, k - xb.shape[1]))
    xb = xb.contiguous()
    if pw.bits == 8:
        return torch._weight_int8pack_mm(xb, *w).float()
    return torch._weight_int4pack_mm_for_cpu(xb, *w).float()
