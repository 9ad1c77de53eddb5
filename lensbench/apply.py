"""Execute a Plan on a loaded model, for real, and restore the dense model afterwards.

    with apply(model, plan):
        model.module.generate(...)      # removed units are not computed at all

Removing a *block* takes it out of the layer list (the model's own loop never visits it) and
lowers `config.num_hidden_layers` to match. Removing a *sublayer* swaps the attention or MLP
module (and the norm in front of it, when nothing else reads that norm) for a stand-in that
returns an all-zero broadcast view: no matmul runs, only the residual add of the block remains.
Kept attention layers are renumbered 0..K-1 so the KV cache holds exactly one entry per attention
that runs (removed layers allocate nothing, and the cache's length is read from a layer that
exists), with `config.layer_types` remapped to match.

Quantising swaps each named nn.Linear / nn.Embedding for a `gpu.modules` QuantLinear /
QuantEmbedding holding packed codes; a tied LM head quantised like its embedding shares the
embedding's packed table. The `gguf` scheme has no kernels here: its weights are overwritten with
the values a GGUF reader computes with (so quality is exact; bytes and speed come from the file).
Packed weights are cached on the Model (keyed by the weight tensor and its version), so re-entering a
plan, as interleaved speed rounds do, does not quantise again.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .model import Model
from .plan import Plan, QuantSpec, Unit, _is_conv1d
from .simquant import dequantised

Target = Plan | Sequence[Unit] | Model  # a Model: another loaded model (a saved checkpoint) run in its place


class _Removed(nn.Module):
    """Stands in for a removed sublayer: adds nothing to the residual, computes nothing."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        zero = x.new_zeros(()).expand_as(x)
        return (zero, None) if self.returns_tuple else zero


class _Surgery:
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

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()


def _remove(model: Model, units: list[Unit], surgery: _Surgery) -> None:
    ad = model.adapter
    blocks = ad.blocks
    dropped = {u.layer for u in units if u.kind == "block"}
    no_attn = {u.layer for u in units if u.kind == "attn"}
    no_mlp = {u.layer for u in units if u.kind == "mlp"}
    kept = [i for i in range(len(blocks)) if i not in dropped]
    for i in no_attn:
        surgery.swap(blocks[i], ad.attn, _Removed(returns_tuple=True))
        if ad.ln1 and ad.ln2:  # ln1 feeds only the attention
            surgery.swap(blocks[i], ad.ln1, nn.Identity())
    for i in no_mlp:
        surgery.swap(blocks[i], ad.mlp, _Removed(returns_tuple=False))
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


def _packed(model: Model, name: str, weight: torch.Tensor, spec: QuantSpec):
    from lensbench.gpu.quant import QuantError, quantize

    cache = model.__dict__.setdefault("_packed_cache", {})
    key = (name, spec, weight.data_ptr(), weight._version, weight.stride())
    if key not in cache:
        try:
            cache[key] = quantize(weight, spec.bits, spec.group_size, symmetric=spec.scheme == "sym").to(weight.device)
        except QuantError as exc:
            raise QuantError(f"{name}: {exc}") from None
    return cache[key]


def _quantise(model: Model, targets: dict[str, QuantSpec], surgery: _Surgery, packed: bool = True) -> None:
    from lensbench.gpu.modules import QuantEmbedding, QuantLinear
    from lensbench.gpu.quant import QuantError

    root = model.module
    by_weight: dict[tuple, object] = {}  # (data_ptr, spec) -> packed, for tied tables
    for name in sorted(targets, key=lambda n: not isinstance(root.get_submodule(n), nn.Embedding)):
        module, spec = root.get_submodule(name), targets[name]
        if not isinstance(module, nn.Embedding) and not isinstance(module, nn.Linear) and not _is_conv1d(module):
            raise QuantError(f"{name} is a {type(module).__name__}, not a linear layer")
        w = module.weight
        if spec.scheme == "gguf" or not packed:  # the weight holds exactly the values a reader computes with
            _overwrite(surgery, w, dequantised(w, spec, _is_conv1d(module)))
            continue
        tied = by_weight.get((w.data_ptr(), spec))
        if isinstance(module, nn.Embedding):
            QuantEmbedding.check(module, name)
            pw = _packed(model, name, w, spec)
            new = QuantEmbedding(pw, w.dtype)
        else:
            if isinstance(module, nn.Linear):
                pw = tied if tied is not None else _packed(model, name, w, spec)
            else:  # GPT-2's Conv1D keeps its weight [in, out]
                pw = _packed(model, name, w.T, spec)
            new = QuantLinear(pw, module.bias, w.dtype)
        by_weight[(w.data_ptr(), spec)] = pw
        surgery.swap(root, name, new)


@torch.no_grad()
def _overwrite(surgery: _Surgery, weight: torch.Tensor, values: torch.Tensor) -> None:
    original = weight.detach().clone()
    surgery.undo.append(lambda: weight.data.copy_(original))
    weight.data.copy_(values)


@contextlib.contextmanager
def apply(model: Model, plan: Plan, *, packed: bool = True) -> Iterator[Model]:
    """Run `model` with `plan` applied inside the block; the dense model is back afterwards, also
    after an exception. The plan is checked against the model before anything changes. With
    `packed=False` quantised weights stay ordinary tensors holding their dequantised values (what a
    saved checkpoint stores for a reader that dequantises)."""
    units = plan.resolve(model)
    targets = plan.quant_targets(model)
    surgery = _Surgery()
    try:
        _quantise(model, targets, surgery, packed)  # before removal: removed sublayers' names vanish
        _remove(model, units, surgery)
        yield model
    finally:
        surgery.restore()


def applied(model: Model, target: Target):
    """`apply` for a Plan, `apply_units` for units already resolved, `swapped` for a saved model."""
    if isinstance(target, Model):
        return swapped(model, target)
    return apply(model, target) if isinstance(target, Plan) else apply_units(model, target)


@contextlib.contextmanager
def swapped(model: Model, other: Model) -> Iterator[Model]:
    """Inside the block `model` runs `other`'s network (a saved checkpoint of it, loaded back), so the
    evaluation code that compares a model with its plan compares it with the saved model instead."""
    old = model.module, model.adapter
    model.module, model.adapter = other.module, other.adapter
    try:
        yield model
    finally:
        model.module, model.adapter = old


@contextlib.contextmanager
def apply_units(model: Model, units: Sequence[Unit]) -> Iterator[Model]:
    """`apply` for units already checked and normalised by `Plan.resolve`."""
    surgery = _Surgery()
    try:
        _remove(model, list(units), surgery)
        yield model
    finally:
        surgery.restore()


def remove_for_good(model: Model, units: Sequence[Unit]) -> None:
    """Remove `units` from a model that will not be restored (one rebuilt from a saved pruned checkpoint)."""
    _remove(model, list(units), _Surgery())


@torch.no_grad()
def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers the module holds now (shared tensors once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
