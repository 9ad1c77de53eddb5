"""Packed linears that read the same input run as one kernel call at decode.

A decode step calls ~7 linears per block, and at batch 1 each call's fixed cost (activation conversion,
kernel launch, output) is a visible share of its time. Attention's q, k and v projections read the same
tensor, as do an MLP's gate and up projections; their packed rows concatenate into one weight of the same
format, so one call computes all of them and each linear takes its slice.

The groups are learnt, not declared: during the first decode step after `install` (run on the exact kernels),
linears called one after another with the very same input tensor are linked (any architecture, no names
needed); at the end of that step each group with one packed format (bits, group size, K) gets its
concatenated weight, kept on the members' PackedWeight for later entries of the same plan, and each member's
codes, scales and mins become row views of it (one copy in memory, not two). From then on the
first member called with an input computes the whole group and keeps the other members' slices (holding a
reference to the input, so identity is never confused with a recycled address); a member called with any
other input runs alone. Outputs are those of the separate calls (each output row depends only on its own
weight row), which `tests/test_quant_kernels.py` checks.
"""
from __future__ import annotations

import torch

from .quant import PackedWeight

MAX_ROWS = 12  # decode-size calls only: prefill's tiled GEMM gains nothing from fusing


class Group:
    def __init__(self, members: list, weight: PackedWeight):
        self.weight = weight
        bounds, start = {}, 0
        for m in members:
            bounds[m] = (start, start + m.pw.shape[0])
            start += m.pw.shape[0]
        self.bounds = bounds
        self.x = None
        self.pending: dict = {}


class Fuser:
    def __init__(self):
        self.learning = False
        self.links: list[list] = []
        self.last: tuple | None = None
        self.groups: dict = {}

    # --- the decode step around it (hooks on the model, see `install`) ------------------------------------
    def begin(self) -> None:
        if not self.groups and not self.links:
            self.learning = True

    def end(self) -> None:
        if self.learning:
            self.learning = False
            self.last = None
            for members in self.links:
                self._fuse(members)

    def _fuse(self, members: list) -> None:
        first = members[0].pw
        if len(members) < 2 or any((m.pw.bits, m.pw.group_size, m.pw.shape[1]) !=
                                   (first.bits, first.group_size, first.shape[1]) for m in members):
            return
        pws = [m.pw for m in members]
        # kept on the first member's PackedWeight, which apply's cache keeps across entries: a plan entered
        # again (interleaved speed rounds) does not concatenate and convert its groups again
        made = first.__dict__.setdefault("_fused", {})
        key = tuple(id(p) for p in pws)
        if key not in made:
            made[key] = PackedWeight(torch.cat([p.packed for p in pws]), torch.cat([p.scales for p in pws]),
                                     torch.cat([p.mins for p in pws]), first.bits, first.group_size,
                                     (sum(p.shape[0] for p in pws), first.shape[1]))
            if any(p.__dict__.get("lean") for p in pws):  # `convert(lean=True)`: no torch layout of the group either
                made[key].__dict__["lean"] = True
        group = Group(members, made[key])
        for m in members:
            self.groups[m] = group
            _share(m, made[key], *group.bounds[m])

    # --- one linear's call --------------------------------------------------------------------------------
    def run(self, module, x: torch.Tensor, matmul) -> torch.Tensor | None:
        """This linear's output [M, N] float32 for input x [..., K] from its group, or None to run it alone.
        `matmul(x2, weight)` computes a group's [M, K] @ weight.T."""
        if self.learning:
            if self.last is not None and self.last[1] is x:
                if self.links and self.links[-1][-1] is self.last[0]:
                    self.links[-1].append(module)
                else:
                    self.links.append([self.last[0], module])
            self.last = (module, x)
            # the exact kernel: a torch kernel would first convert this linear's weight to its own layout,
            # which the group's weight makes unneeded from the next step on
            from .cpu_kernels import gemv  # optional: numba (fusion is installed where it is)
            return gemv(x.reshape(-1, x.shape[-1]), module.pw)
        group = self.groups.get(module)
        if group is None:
            return None
        if group.x is x and module in group.pending:
            out = group.pending.pop(module)
            if not group.pending:
                group.x = None
            return out
        y = matmul(x.reshape(-1, x.shape[-1]), group.weight)
        group.pending = {m: y[:, a:b].contiguous() for m, (a, b) in group.bounds.items() if m is not module}
        group.x = x
        a, b = group.bounds[module]
        return y[:, a:b].contiguous()


def _share(module, fused: PackedWeight, a: int, b: int) -> None:
    """The member's codes, scales and mins become rows a:b of its group's weight (contiguous views), so the
    process holds one copy of them, not the members' and the group's. What kernels derived from the old tensors
    (numpy views, torch's layout) is dropped and derived again from the views when a member runs alone."""
    pw = module.pw
    if pw.packed.data_ptr() == fused.packed[a:b].data_ptr():
        return
    views = fused.packed[a:b], fused.scales[a:b], fused.mins[a:b]
    pw.packed, pw.scales, pw.mins = views
    for derived in ("_np", "_torch_layout"):
        pw.__dict__.pop(derived, None)
    module.packed, module.scales, module.mins = views  # the module's buffers: the same tensors as its pw's


def install(root: torch.nn.Module, linears: list) -> callable:
    """Fusion for `linears` (QuantLinear modules inside `root`); returns the function that removes it."""
    fuser = Fuser()
    for m in linears:
        m.__dict__["fuser"] = fuser

    def pre(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.numel() <= MAX_ROWS and not ids.is_cuda:
            fuser.begin()

    def post(mod, args, kwargs, out):
        fuser.end()

    handles = [root.register_forward_pre_hook(pre, with_kwargs=True),
               root.register_forward_hook(post, with_kwargs=True)]

    def remove() -> None:
        for h in handles:
            h.remove()
        for m in linears:
            m.__dict__.pop("fuser", None)
    return remove


def unlearnt(linears: list) -> bool:
    """Whether a fuser installed on any of `linears` has yet to see its first decode step (which learns its
    groups): a caller that runs steps outside the model's hooks (a compiled step) runs one eager step first."""
    fusers = {id(f): f for f in (m.__dict__.get("fuser") for m in linears) if f is not None}
    return any(not f.groups and not f.links for f in fusers.values())
