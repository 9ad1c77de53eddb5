"""What packed linears run with on the CPU: the adaptive thread policy (`threads`) and fused calls (`fusion`).

Every way a packed model comes to be — `apply` (a plan entered), `convert` (a plan made permanent) and the
packed loaders (a compressed-tensors folder or a GGUF file read straight into packed modules) — installs the
same two, so a model decodes the same however it was made. Without the thread policy a decode step on numba's
parallel kernels waits, under CPU contention, for whichever of its threads the OS has preempted; and numba's
OpenMP runtime is not torch's (two thread pools in one process, each spinning after its parallel regions),
so a step on every core can take many times its quiet time (benchmarks/decode.py times the exact numba path
under load, reports/DECODE.md).
"""
from __future__ import annotations

from torch import nn

from . import fusion, threads
from .modules import QuantLinear


def install(root: nn.Module, linears: list[QuantLinear] | None = None) -> callable:
    """The thread policy around `root`'s decode-size forwards (unless `root` has one already) and fusion of
    `linears` (default: every QuantLinear in `root`); returns the function that removes what this call
    installed. Installs nothing for a model on another device."""
    linears = [m for m in root.modules() if isinstance(m, QuantLinear)] if linears is None else linears
    param = next(root.parameters(), None)
    if not linears or (param is not None and param.device.type != "cpu"):
        return lambda: None
    undo = [] if "lensbench_threads" in root.__dict__ else [threads.install(root)]
    undo.append(fusion.install(root, linears))

    def remove() -> None:
        for f in reversed(undo):
            f()
    return remove
