"""Execute a Plan on a loaded model, for real, and restore the dense model afterwards.

    with apply(model, plan):
        model.module.generate(...)      # removed units are not computed at all

Each action type has one handler registered here (`@handles(ActionType)`), run in registration order:
quantisation first (removed sublayers' names vanish), then the KV cache (a hook on the decoder that hands
every forward that would start a fresh dense cache a `lensbench.kvcache.KVCache` instead, so `generate`
and `model(..., use_cache=True)` decode with it unchanged; on sdpa models decode steps read the packed
states directly, `kvcache.packed_sdpa`), then removal (`lensbench.surgery`: blocks leave
the layer list, sublayers are swapped for stand-ins that compute nothing). A new action type registers its
handler the same way.

Quantising swaps each named nn.Linear / nn.Embedding for a `gpu.modules` QuantLinear /
QuantEmbedding holding packed codes; a tied LM head quantised like its embedding shares the
embedding's packed table. The `gguf` scheme has no kernels here: its weights are overwritten with
the values a GGUF reader computes with (so quality is exact; bytes and speed come from the file).
Packed weights are cached on the Model (keyed by the weight tensor and its version), so re-entering a
plan, as interleaved speed rounds do, does not quantise again.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..gpu import runtime
from ..gpu.dispatch import missing_kernel
from ..gpu.mixed import MixedWeight, quantize_mixed
from ..gpu.modules import MixedQuantLinear, QuantEmbedding, QuantLinear, make_lean
from ..errors import PlanError
from ..gpu.quant import PackedWeight, QuantError, quantize
from ..gpu.reference import dequantize
from ..model import Model
from ..surgery import Surgery, apply_units, remove_units
from ..units import Unit, is_conv1d
from ..kvcache import KVCache, use_packed_attention
from .plan import KV, Action, Bound, Drop, Plan, Quant
from ..simquant import dequantised

Target = Plan | Bound | Sequence[Unit] | Model  # a Model: another loaded model (a saved checkpoint) in its place


class Options(NamedTuple):
    """How `apply` executes a plan: `packed` modules (else dense tensors holding the dequantised values), and
    whether a packed weight with no kernel on its device may run on the slow reference path."""

    packed: bool = True
    allow_slow: bool = False


Handler = Callable[[Model, Bound, Surgery, Options], None]
HANDLERS: dict[type[Action], Handler] = {}


def handles(action_type: type[Action]):
    """Register the function that executes every action of `action_type` in a bound plan:
    `handler(model, bound, surgery, options)`, recording each change in `surgery` so it is undone."""
    def deco(fn: Handler) -> Handler:
        HANDLERS[action_type] = fn
        return fn
    return deco


def packed_cache(model: Model) -> dict:
    """The model's packed weights, keyed by `cache_key`: re-entering a plan does not quantise again, and GPTQ
    (`compress.gptq.prepare`) leaves its results here for `apply` to use."""
    return model.__dict__.setdefault("packed_cache", {})


def cache_key(name: str, weight: torch.Tensor, spec: Quant) -> tuple:
    """A packed weight is valid for this module, grid and rounding and these exact weight values."""
    return name, spec, weight.data_ptr(), weight._version, weight.stride()


def packed_weight(model: Model, name: str, weight: torch.Tensor, spec: Quant) -> PackedWeight | MixedWeight:
    """`weight` [N, K] of module `name` packed as `spec`: from the cache, or rounded to nearest now (a
    MixedWeight when `spec` gives per-group widths)."""
    cache = packed_cache(model)
    key = cache_key(name, weight, spec)
    if key not in cache:
        if spec.method != "rtn":
            raise PlanError(f"{name} is quantised with {spec.method}, which needs calibration text: evaluate or "
                            f"compress the plan (they run it), or call lensbench.compress.gptq.prepare first")
        try:
            sym = spec.scheme == "sym"
            q = (quantize_mixed(weight, spec.group_bits, spec.group_size, sym) if spec.group_bits else
                 quantize(weight, spec.bits, spec.group_size, symmetric=sym))
            cache[key] = q.to(weight.device)
        except QuantError as exc:
            raise QuantError(f"{name}: {exc}") from None
    return cache[key]


@handles(Quant)
def _quantise(model: Model, bound: Bound, surgery: Surgery, options: Options) -> None:
    targets = bound.quant
    root = model.module
    by_weight: dict[tuple, object] = {}  # (data_ptr, spec) -> packed, for tied tables
    linears: list[QuantLinear] = []
    for name in sorted(targets, key=lambda n: not isinstance(root.get_submodule(n), nn.Embedding)):
        module, spec = root.get_submodule(name), targets[name]
        if not isinstance(module, nn.Embedding) and not isinstance(module, nn.Linear) and not is_conv1d(module):
            raise QuantError(f"{name} is a {type(module).__name__}, not a linear layer")
        w = module.weight
        if spec.scheme == "gguf" or not options.packed:  # the weight holds exactly the values a reader computes with
            if spec.method == "rtn":
                surgery.overwrite(w, dequantised(w, spec, is_conv1d(module)))
            else:
                q = dequantize(packed_weight(model, name, w.T if is_conv1d(module) else w, spec)).to(w.dtype)
                surgery.overwrite(w, q.T if is_conv1d(module) else q)
            continue
        tied = by_weight.get((w.data_ptr(), spec))
        if isinstance(module, nn.Embedding):
            QuantEmbedding.check(module, name)
            pw = packed_weight(model, name, w, spec)
            new = QuantEmbedding(pw, w.dtype)
        else:
            if isinstance(module, nn.Linear):
                pw = tied if tied is not None else packed_weight(model, name, w, spec)
            else:  # GPT-2's Conv1D keeps its weight [in, out]
                pw = packed_weight(model, name, w.T, spec)
            new = (MixedQuantLinear(pw, module.bias, w.dtype) if isinstance(pw, MixedWeight) else
                   QuantLinear(pw, module.bias, w.dtype))
        by_weight[(w.data_ptr(), spec)] = pw
        if not isinstance(new, QuantEmbedding):  # a lookup reads only its rows on any device
            _check_kernel(name, pw, w.device, options)
        surgery.swap(root, name, new)
        if isinstance(new, QuantLinear):
            linears.append(new)
    if linears:  # decode steps on as many threads as are fastest now; linears reading one input: one call
        surgery.undo.append(runtime.install(root, linears))


def _check_kernel(name: str, pw: PackedWeight | MixedWeight, device: torch.device, options: Options) -> None:
    """One line when no kernel runs `pw` on `device`, unless the slow reference path was asked for."""
    for part in (p for _, p in pw.parts) if isinstance(pw, MixedWeight) else (pw,):
        why = missing_kernel(part, device)
        if why and not options.allow_slow:
            raise QuantError(f"{name}: {why}; or pass --allow-slow (lensbench evaluate, generate) or allow_slow=True "
                             f"(lensbench.apply, EvalConfig) to run it on the reference path, which dequantises the "
                             f"whole weight on every call")


@handles(KV)
def _kv(model: Model, bound: Bound, surgery: Surgery, options: Options) -> None:
    if not bound.kv:
        return
    ad, gone = model.adapter, {u.layer for u in bound.units if u.kind in ("block", "attn")}
    # the attention modules, found before removal renumbers them; their cache index is read at run time
    attns = {i: next(m for m in ad.blocks[i].get_submodule(ad.attn).modules() if hasattr(m, "layer_idx"))
             for i in bound.kv if i not in gone}
    config = model.module.config

    def fresh_cache(module, args, kwargs):
        cache = kwargs.get("cache")
        if (cache is None and kwargs.get("use_cache")) or (type(cache) is DynamicCache and not cache.get_seq_length()):
            kwargs["cache"] = KVCache(config, {m.layer_idx: bound.kv[i] for i, m in attns.items()})
        return args, kwargs

    handle = ad.base.register_forward_pre_hook(fresh_cache, with_kwargs=True)
    surgery.undo.append(handle.remove)
    surgery.undo.append(use_packed_attention(model.module))  # decode steps read the packed states directly


@handles(Drop)
def _drop(model: Model, bound: Bound, surgery: Surgery, options: Options) -> None:
    remove_units(model, bound.units, surgery)


@contextlib.contextmanager
def apply(model: Model, plan: Plan | Bound, *, packed: bool = True, allow_slow: bool = False) -> Iterator[Model]:
    """Run `model` with `plan` applied inside the block; the dense model is back afterwards, also
    after an exception. The plan is checked against the model before anything changes (pass
    `plan.bind(model)` to check it once for many entries). With `packed=False` quantised weights stay
    ordinary tensors holding their dequantised values (what a saved checkpoint stores for a reader that
    dequantises). A packed weight that no kernel runs on its device (int2/3/5/6 on CUDA) is refused in one line
    unless `allow_slow=True` (or a Bound's `allow_slow`) lets it run on the reference path.

        >>> with lb.apply(model, plan):                     # a plan that drops one block
        ...     inside = model.module.config.num_hidden_layers
        >>> inside == model.module.config.num_hidden_layers - 1
        True
    """
    bound = plan if isinstance(plan, Bound) else plan.bind(model)
    surgery = Surgery()
    try:
        options = Options(packed, allow_slow or bound.allow_slow)
        for handler in HANDLERS.values():
            handler(model, bound, surgery, options)
        yield model
    finally:
        surgery.restore()


def convert(model: Model, plan: Plan | Bound, *, lean: bool = False, allow_slow: bool = False) -> Model:
    """Quantise `model` in place for good (torchao's `quantize_`): every layer the plan quantises keeps only its
    packed weight and the dense one is released, so the process holds the packed bytes, not both. There is no way
    back (load the model again for the dense one), so a plan that removes layers is refused: save it with
    `lensbench compress` instead. With `lean=True` decode also stays off torch's weight-only kernels, whose own
    copy of the codes would sit beside the packed bytes (decode then runs the exact numba kernels: less memory,
    slower). Returns `model`, whose fingerprint is now that of its packed weights."""
    bound = plan if isinstance(plan, Bound) else plan.bind(model)
    if bound.units:
        raise PlanError(f"convert quantises in place and cannot remove {bound.units[0]}: save the plan with "
                        f"lensbench compress (or run it inside lensbench.apply)")
    surgery = Surgery()
    options = Options(True, allow_slow or bound.allow_slow)
    for handler in HANDLERS.values():
        handler(model, bound, surgery, options)
    surgery.undo.clear()  # no way back: the dense modules and weights the undo held are released
    model.__dict__.pop("packed_cache", None)  # the packed weights now live in the modules only
    _own_storage(model.module)
    if lean:
        make_lean(model.module)
    model.card.pop("fingerprint", None)
    _trim()
    return model


def _own_storage(root: nn.Module) -> None:
    """The parameters left dense (norms, biases, layers the plan keeps) get memory of their own. Loaded from a
    memory-mapped weight file they point into its mapping, and a single norm weight would keep the whole mapping,
    with the released weights' pages, resident. Tied parameters stay tied."""
    copies: dict[int, nn.Parameter] = {}
    for module in root.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            module._parameters[name] = copies[id(p)]


def _trim() -> None:
    """Hand the released weights' memory back to the OS: glibc keeps freed heap memory unless asked to trim it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def applied(model: Model, target: Target):
    """`apply` for a Plan (or one already bound), `apply_units` for units already resolved, `swapped` for a
    saved model."""
    if isinstance(target, Model):
        return swapped(model, target)
    return apply(model, target) if isinstance(target, (Plan, Bound)) else apply_units(model, target)


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
