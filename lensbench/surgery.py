"""Module surgery: take units out of a loaded model and put them back.

Removing a *block* takes it out of the layer list (the model's own loop never visits it) and
lowers `config.num_hidden_layers` to match. Removing a *sublayer* swaps the attention or MLP
module (and the norm in front of it, when nothing else reads that norm) for a stand-in that
returns an all-zero broadcast view: no matmul runs, only the residual add of the block remains.
Kept attention layers are renumbered 0..K-1 so the KV cache holds exactly one entry per attention
that runs (removed layers allocate nothing, and the cache's length is read from a layer that
exists), with `config.layer_types` remapped to match. Every change is recorded in a `Surgery` and
undone in reverse order.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .model import Model
from .numeric import storage_bytes
from .units import Unit


class Removed(nn.Module):
    """Stands in for a removed sublayer: adds nothing to the residual, computes nothing."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        zero = x.new_zeros(()).expand_as(x)
        return (zero, None) if self.returns_tuple else zero


class Surgery:
    """Module swaps and attribute changes, undone in reverse order."""

    def __init__(self):
        self.undo: list = []

    def swap(self, root: nn.Module, path: str, new: nn.Module) -> None:
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        old = getattr(parent, name)
        self.undo.append(lambda: setattr(parent, name, old))
        setattr(parent, name, new)

    def set(self, obj, name: str, value) -> None:
        had, old = hasattr(obj, name), getattr(obj, name, None)
        self.undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))
        setattr(obj, name, value)

    @torch.no_grad()
    def overwrite(self, weight: torch.Tensor, values: torch.Tensor) -> None:
        """Write `values` into `weight` in place; restored from a copy."""
        original = weight.detach().clone()
        self.undo.append(lambda: weight.data.copy_(original))
        weight.data.copy_(values)

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()


def remove_units(model: Model, units: list[Unit], surgery: Surgery) -> None:
    ad = model.adapter
    blocks = ad.blocks
    dropped = {u.layer for u in units if u.kind == "block"}
    no_attn = {u.layer for u in units if u.kind == "attn"}
    no_mlp = {u.layer for u in units if u.kind == "mlp"}
    kept = [i for i in range(len(blocks)) if i not in dropped]
    for i in no_attn:
        surgery.swap(blocks[i], ad.attn, Removed(returns_tuple=True))
        if ad.ln1 and ad.ln2:  # ln1 feeds only the attention
            surgery.swap(blocks[i], ad.ln1, nn.Identity())
    for i in no_mlp:
        surgery.swap(blocks[i], ad.mlp, Removed(returns_tuple=False))
        if ad.ln2:
            surgery.swap(blocks[i], ad.ln2, nn.Identity())
    if not dropped and not no_attn:
        return
    attending = [i for i in kept if i not in no_attn]
    for new, i in enumerate(attending):
        for m in blocks[i].get_submodule(ad.attn).modules():
            if hasattr(m, "layer_idx"):
                surgery.set(m, "layer_idx", new)
    cfg = model.module.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:  # cache layer j serves the j-th attention that runs
        surgery.set(cfg, "layer_types", [types[i] for i in attending] + [types[i] for i in kept if i in no_attn])
    if dropped:
        surgery.swap(ad.base, ad.layers, nn.ModuleList([blocks[i] for i in kept]))
        surgery.set(cfg, "num_hidden_layers", len(kept))


@contextlib.contextmanager
def apply_units(model: Model, units: Sequence[Unit]) -> Iterator[Model]:
    """`apply` for units already checked and normalised by `Plan.resolve`."""
    surgery = Surgery()
    try:
        remove_units(model, list(units), surgery)
        yield model
    finally:
        surgery.restore()


def remove_for_good(model: Model, units: Sequence[Unit]) -> None:
    """Remove `units` from a model that will not be restored (one rebuilt from a saved pruned checkpoint)."""
    remove_units(model, list(units), Surgery())


@torch.no_grad()
def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers the module holds now (shared tensors once)."""
    return storage_bytes(list(module.parameters()) + list(module.buffers()))
