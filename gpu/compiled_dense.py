"""Dense float32 linears of a compiled decode step on the native multi-threaded kernel.

At decode size a float32 linear reads its whole weight for a few activation rows, and torch's kernel for it
(MKL's gemv, what inductor calls for `mm`) runs on one thread at SmolLM2's shapes whatever torch's thread
count, so a dense model's decode drew one core's memory bandwidth. `PASS` is an inductor graph pass (given to
`torch.compile` as `post_grad_custom_post_pass`) that rewrites each `mm(x, w.T)` / `addmm(b, x, w.T)` whose
weight `w` is a float32 graph input with contiguous rows and whose `x` has at most `MAX_ROWS` rows into
`lensbench_native::dense_mm` (`native/dense.cpp`: the weight's rows split over torch's threads), plus the
bias. Packed linears never reach it: they trace into their own kernels (`compiled`). Above `MAX_ROWS` rows
torch's kernel stays (benchmarks/decode.py tables both on SmolLM2's block linears by activation rows).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

MAX_ROWS = 8
_SOURCE = Path(__file__).parent / "native" / "dense.cpp"


def _weight(node) -> torch.fx.Node | None:
    """`w` when `node` is `permute(w, [1, 0])` of a float32 graph input [N, K] with contiguous rows."""
    if (node.op != "call_function" or node.target is not torch.ops.aten.permute.default
            or list(node.args[1]) != [1, 0]):
        return None
    w = node.args[0]
    val = w.meta.get("val") if w.op == "placeholder" else None
    if val is None or val.dtype != torch.float32 or val.dim() != 2 or val.device.type != "cpu" or val.stride(1) != 1:
        return None
    return w


def _rows(node) -> bool:
    val = node.meta.get("val")
    return val is not None and val.dtype == torch.float32 and val.dim() == 2 and val.shape[0] <= MAX_ROWS


class DensePass(CustomGraphPass):
    """mm / addmm of a few float32 rows by a float32 weight input -> `lensbench_native::dense_mm`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
                continue
            if node.kwargs:  # addmm's beta / alpha
                continue
            bias, x, wt = (None, *node.args) if node.target is aten.mm.default else node.args
            w = _weight(wt)
            if w is None or not _rows(x):
                continue
            with graph.inserting_before(node):
                y = graph.call_function(torch.ops.lensbench_native.dense_mm.default, (x, w))
                y.meta["val"] = node.meta["val"]
                if bias is not None:
                    y = graph.call_function(aten.add.Tensor, (y, bias))
                    y.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(y)
            graph.erase_node(node)
        graph.eliminate_dead_code()

    def uuid(self) -> bytes:
        """The compiled-graph cache's key for this pass: its code and the kernel's."""
        return hashlib.sha256(Path(__file__).read_bytes() + _SOURCE.read_bytes()).digest()


PASS = DensePass()
