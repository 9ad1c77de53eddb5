"""Packed linears inside a `torch.compile`d graph (CPU): what `QuantLinear` runs while dynamo traces it.

The eager path (`dispatch`, `fusion`) decides per call and keeps Python state; a compiled decode step needs
every decision taken once, before tracing. `prepare(root)` takes them per packed module and keeps the result
on it; while compiling, the module's forward calls `linear`/`rows` here, which trace into

* lensbench's native int4/int8 kernel (`cpu_native`, the op `lensbench_native::packed_mm`, C++ that inductor's
  C++ wrapper calls without Python) for the weights it holds, else torch's int4/int8 weight-only kernels
  (`cpu_torch`), plain aten ops inductor calls directly, for the weights they hold exactly (neither when the
  exact kernels were asked for); or
* `lensbench::packed_matmul`, a custom op that runs the numba kernels: dynamo sees one opaque call with a
  known output shape instead of breaking the graph at numba.

A packed embedding's lookup is traced as the reference unpacking of the rows it reads (a few torch ops).

A custom op takes tensors and numbers, not a PackedWeight, so `prepare` files each weight under a handle
(its id) in a table that holds it weakly; the handle is a constant of the graph.
"""
from __future__ import annotations

import weakref

import torch

from . import cpu_kernels, cpu_native, cpu_torch, reference
from .quant import PackedWeight

_WEIGHTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # handle -> PackedWeight


def _weight(handle: int) -> PackedWeight:
    pw = _WEIGHTS.get(handle)
    if pw is None:
        raise RuntimeError("a compiled graph calls a packed weight that no longer exists: prepare the model "
                           "again (lensbench.decoding.Decoder) after changing its packed modules")
    return pw


@torch.library.custom_op("lensbench::packed_matmul", mutates_args=())
def packed_matmul(x: torch.Tensor, handle: int) -> torch.Tensor:
    """x [M, K] float32 @ W_hat.T -> [M, N] float32 on the numba kernels (gemv or tiles by rows)."""
    return cpu_kernels.matmul(x, _weight(handle))


@packed_matmul.register_fake
def _(x, handle):
    return x.new_empty((x.shape[0], _weight(handle).shape[0]))


class _Stash:
    """A fused group's output while a step runs: its first member computes every member's rows."""
    y: torch.Tensor | None = None


def _decision(pw: PackedWeight, exact: bool) -> tuple:
    _WEIGHTS[id(pw)] = pw
    if not exact and cpu_native.supported(pw):
        return ("native", id(pw), *cpu_native.args(pw))
    if not exact and cpu_torch.supported(pw):
        k, *w = cpu_torch.layout(pw)
        return (f"torch{pw.bits}", id(pw), k, *w)
    return ("numba", id(pw))


def prepare(linears, tables=(), exact: bool | None = None) -> dict[str, int]:
    """Take each packed module's kernel decision for compiled decode (a linear, unless `exact`: the native
    kernel where it holds the weight, else torch's kernel where one holds it exactly; otherwise the numba op; a
    table: the numba lookup) and keep it on the module; returns how many linears run on each kernel ("native",
    "torch4", "torch8", "numba"). Linears `fusion` grouped (same input, one format) run as their group's one
    matmul: the first member called computes it, the others take their columns."""
    exact = cpu_kernels.EXACT if exact is None else exact
    kinds: dict[str, int] = {}
    for m in tables:
        m.__dict__["_compiled"] = ("rows",)
    groups = {}
    for m in linears:
        fuser = m.__dict__.get("fuser")
        group = fuser.groups.get(m) if fuser is not None else None
        if group is None:
            m.__dict__["_compiled"] = (None, _decision(m.pw, exact), None)
        else:
            if id(group) not in groups:
                groups[id(group)] = (_decision(group.weight, exact), _Stash(), next(iter(group.bounds)))
            decision, stash, first = groups[id(group)]
            m.__dict__["_compiled"] = (m is first, decision, (stash, *group.bounds[m]))
        kind = m.__dict__["_compiled"][1][0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def release(modules) -> None:
    for m in modules:
        m.__dict__.pop("_compiled", None)


def prepared(module) -> bool:
    return "_compiled" in module.__dict__


def _matmul(decision: tuple, x2: torch.Tensor) -> torch.Tensor:
    kind, handle, *w = decision
    if kind == "native" and x2.shape[0] <= cpu_native.MAX_ROWS:
        return cpu_native.call(x2, *w)
    if kind in ("torch4", "torch8") and x2.shape[0] <= cpu_kernels.TORCH_MAX_ROWS:
        k, *args = w
        xb = x2.to(torch.bfloat16)
        if k != xb.shape[1]:
            xb = torch.nn.functional.pad(xb, (0, k - xb.shape[1]))
        op = torch._weight_int8pack_mm if kind == "torch8" else torch._weight_int4pack_mm_for_cpu
        return op(xb, *args).float()
    return torch.ops.lensbench.packed_matmul(x2.float().contiguous(), handle)


def linear(module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A prepared packed linear's output x [..., K] @ W_hat.T (+ bias), traced into the graph being compiled."""
    first, decision, member = module.__dict__["_compiled"]
    x2 = x.reshape(-1, x.shape[-1])
    if member is None:
        y = _matmul(decision, x2)
    else:
        stash, a, b = member
        if first:
            stash.y = _matmul(decision, x2)
        y = stash.y[:, a:b]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def rows(module, ids: torch.Tensor) -> torch.Tensor:
    """A prepared QuantEmbedding's lookup, traced into the graph being compiled: the reference unpacking of the
    rows read, which inductor fuses into one loop."""
    pw = PackedWeight(module.packed, module.scales, module.mins, module.bits, module.group_size, module.shape)
    return reference.dequantize(pw, ids.reshape(-1), module.dtype).reshape(*ids.shape, pw.shape[1])
