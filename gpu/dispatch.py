"""One entry point for a packed matmul: Triton on CUDA (int4/int8), numba on the CPU, and the
reference for what no kernel covers (low-bit on CUDA, a machine without numba/triton, or a
forward that needs gradients with respect to the activations: the kernels are inference-only)."""
from __future__ import annotations

import functools

import torch

from . import reference
from .quant import PackedWeight


@functools.cache
def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


CPU_KERNELS = _have("numba")
if CPU_KERNELS:
    from .cpu_kernels import matmul as cpu_matmul  # optional: numba; compiles its kernels on first use
else:  # pragma: no cover
    cpu_matmul = reference.matmul


TRITON_BITS = (4, 8)  # the widths the CUDA kernels run


def missing_kernel(pw: PackedWeight, device: torch.device) -> str | None:
    """Why no kernel runs `pw` on `device` (so `matmul` would take the reference path, which dequantises the whole
    weight on every call), or None when one does."""
    if device.type == "cuda":
        if not _have("triton"):
            return "the CUDA kernels need Triton (pip install 'lensbench[gpu]')"
        if pw.bits not in TRITON_BITS:
            return (f"the CUDA kernels run int{' and int'.join(map(str, TRITON_BITS))}, not int{pw.bits} (choose "
                    f"bits {' or '.join(map(str, TRITON_BITS))})")
        return None
    if device.type != "cpu":
        return f"no packed kernel runs on {device.type} (the kernels run on cpu and cuda)"
    return None if _have("numba") else "the CPU kernels need numba (pip install numba)"


def kernel_for(x: torch.Tensor, pw: PackedWeight) -> str:
    """Which implementation `matmul` uses for these operands: "triton", "cpu" or "reference"."""
    if torch.is_grad_enabled() and x.requires_grad:
        return "reference"  # the kernels are inference-only; the reference is differentiable in x
    if x.is_cuda:
        return "triton" if pw.bits in (4, 8) and _have("triton") else "reference"
    return "cpu" if x.device.type == "cpu" and _have("numba") else "reference"


def matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W_hat.T (+ bias), on the fastest implementation available for x's device."""
    kind = kernel_for(x, pw)
    if kind == "triton":
        from . import triton_kernels  # optional: triton (the gpu extra), on CUDA tensors only
        return triton_kernels.matmul(x, pw, bias)
    if kind == "cpu":
        from . import cpu_kernels  # optional: numba
        return cpu_kernels.matmul(x, pw, bias)
    return reference.matmul(x, pw, bias)


def embedding(ids: torch.Tensor, pw: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a packed embedding table, dequantised: [*ids.shape, d]."""
    flat = ids.reshape(-1)
    if not ids.is_cuda and _have("numba"):
        from . import cpu_kernels  # optional: numba
        rows = cpu_kernels.dequantize_rows(pw, flat)
    else:
        rows = reference.dequantize(pw, flat)
    return rows.to(dtype).reshape(*ids.shape, pw.shape[1])
