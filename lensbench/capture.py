"""Capture every requested site of every layer in ONE forward pass.

`capture(model, texts)` returns a `Trace`. Two backends give identical tensors:

* "hooks" (default): plain PyTorch forward hooks, one per distinct module boundary, owned by the
  `Hooks` context manager which removes every handle in `finally` (also after an exception).
  Position reduction ("last", "mean") happens inside the hook, so only reduced tensors are kept.
* "nnsight": the same taps read through nnsight's tracing (imported lazily). It is the route to
  nnsight's remote execution for models that do not fit on this machine.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .adapters import SITES, Sum, Tap, site_name
from .errors import LensbenchError
from .model import Batch, Model
from .trace import POSITIONS, Trace

# Forward order inside a block; the nnsight backend must read taps in this order.
FORWARD_ORDER = ("hook_resid_pre", "ln1.hook_normalized", "hook_attn_out", "hook_resid_mid",
                 "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture: sites, layers, position reduction and storage dtype."""

    sites: tuple[str, ...] = SITES
    layers: tuple[int, ...] | None = None  # None: all layers
    positions: str = "all"
    dtype: torch.dtype | None = torch.float32  # None: keep the model's dtype

    def validate(self, model: Model) -> "CaptureSpec":
        if self.positions not in POSITIONS:
            raise LensbenchError(f"unknown positions {self.positions!r}: use one of {', '.join(POSITIONS)}")
        bad = [s for s in self.sites if s not in FORWARD_ORDER]
        if bad:
            raise LensbenchError(f"unknown site(s) {', '.join(bad)}: use any of {', '.join(FORWARD_ORDER)}")
        layers = tuple(range(model.n_layers)) if self.layers is None else tuple(self.layers)
        out = [i for i in layers if not 0 <= i < model.n_layers]
        if out:
            raise LensbenchError(f"layer(s) {out} out of range: {model.name} has layers 0..{model.n_layers - 1}")
        sites = tuple(s for s in FORWARD_ORDER if s in self.sites)
        return CaptureSpec(sites, layers, self.positions, self.dtype)

    def taps(self, model: Model) -> list[tuple[int, Tap]]:
        """Distinct taps in forward order."""
        seen: dict[tuple[int, Tap], None] = {}
        for layer in self.layers:
            for site in self.sites:
                where = model.adapter.site(layer, site)
                for tap in where.parts if isinstance(where, Sum) else (where,):
                    seen.setdefault((layer, tap), None)
        return list(seen)


def reduce_positions(x: torch.Tensor, batch: Batch, positions: str, dtype) -> torch.Tensor:
    """[B, T, d] -> the stored form for `positions` (see Trace)."""
    x = x.detach()
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if positions == "all":
        return x
    mask = batch.attention_mask.to(x.device)
    if positions == "last":
        last = mask.sum(1) - 1  # right padding: last real token
        return x[torch.arange(x.shape[0], device=x.device), last]
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def assemble(model: Model, spec: CaptureSpec, raw: dict[tuple[int, Tap], torch.Tensor], batch: Batch) -> Trace:
    """Turn per-tap tensors (already position-reduced) into a Trace of canonical sites."""
    acts: dict[str, torch.Tensor] = {}
    for layer in spec.layers:
        for site in spec.sites:
            where = model.adapter.site(layer, site)
            if isinstance(where, Sum):
                acts[site_name(layer, site)] = sum(raw[(layer, t)] for t in where.parts)
            else:
                acts[site_name(layer, site)] = raw[(layer, where)]
    return Trace(acts, spec.positions, batch.input_ids, batch.attention_mask, batch.content_mask,
                 {"name": model.name, "fingerprint": model.fingerprint()})


class Hooks:
    """Context manager owning forward hooks; every handle is removed on exit, even after an exception."""

    def __init__(self):
        self.handles: list = []

    def add_output(self, module: torch.nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        self.handles.append(module.register_forward_hook(lambda m, args, out: fn(_first(out))))

    def add_input(self, module: torch.nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        def pre(m, args, kwargs):
            fn(args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()))))

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def capture_batch(model: Model, spec: CaptureSpec, batch: Batch) -> tuple[Trace, object]:
    """The hooks backend on one tokenised batch: (trace, model output)."""
    raw: dict[tuple[int, Tap], torch.Tensor] = {}
    with Hooks() as hooks:
        for layer, tap in spec.taps(model):
            module = model.adapter.module_at(layer, tap)

            def store(x, key=(layer, tap)):
                raw[key] = reduce_positions(x, batch, spec.positions, spec.dtype)

            (hooks.add_input if tap.io == "input" else hooks.add_output)(module, store)
        with torch.no_grad():
            output = model.module(**batch.model_inputs())
    return assemble(model, spec, raw, batch), output


def _envoys_by_path(wrapped) -> dict[str, object]:
    """nnsight envoys keyed by module path (attribute access would collide with modules named `output`)."""
    root = wrapped.path
    return {e.path[len(root) + 1:] if e.path != root else "": e for e in wrapped.modules()}


def _capture_nnsight(model: Model, spec: CaptureSpec, batch: Batch) -> tuple[Trace, object]:
    try:
        import nnsight  # optional: nnsight (the peers extra)
        from nnsight import NNsight  # optional: nnsight (the peers extra)
    except ImportError:
        raise LensbenchError("the nnsight backend needs nnsight: pip install 'lensbench[peers]'") from None
    with warnings.catch_warnings():  # submodules named `output` (BERT) are reached by path below
        warnings.filterwarnings("ignore", message=".*has a submodule named")
        wrapped = NNsight(model.module)
    base = model.adapter.block_path(0).rsplit(".", 1)[0]  # path of the layer list in the top model
    taps = spec.taps(model)
    envoys = _envoys_by_path(wrapped)
    with torch.no_grad(), wrapped.trace(**batch.model_inputs()):
        values = []
        for layer, tap in taps:
            env = envoys[f"{base}.{layer}.{tap.module}".rstrip(".")]
            values.append(env.input if tap.io == "input" else env.output)
        saved = nnsight.save(values)
        out = wrapped.output.save()
    raw = {key: reduce_positions(_first(v), batch, spec.positions, spec.dtype)
           for key, v in zip(taps, saved, strict=True)}
    return assemble(model, spec, raw, batch), out


BACKENDS = {"hooks": capture_batch, "nnsight": _capture_nnsight}


def capture(model: Model, texts: Sequence[str] | Batch, *, sites: Iterable[str] = SITES,
            layers: Iterable[int] | None = None, positions: str = "all", backend: str = "hooks",
            max_length: int | None = None, dtype: torch.dtype | None = torch.float32,
            return_output: bool = False):
    """Run the model once on `texts` and return a Trace of `sites` at `layers`.

        >>> trace = lb.capture(model, ["The cat sat on the mat."], sites=["hook_resid_post"])
        >>> trace["blocks.0.hook_resid_post"].shape[-1] == model.d_model
        True

    `max_length` truncates each text; without it a text longer than the model's context is an error.
    With `return_output=True`, returns (trace, model_output).
    """
    if backend not in BACKENDS:
        raise LensbenchError(f"unknown capture backend {backend!r}: use one of {', '.join(BACKENDS)}")
    spec = CaptureSpec(tuple(sites), None if layers is None else tuple(layers), positions, dtype).validate(model)
    batch = texts if isinstance(texts, Batch) else model.tokenize(texts, max_length=max_length)
    trace, output = BACKENDS[backend](model, spec, batch)
    return (trace, output) if return_output else trace


def batches(model: Model, texts: Sequence[str], batch_size: int, max_length: int | None) -> Iterator[Batch]:
    """Tokenised batches of `texts` in order (fixed, so streamed runs can resume by batch index)."""
    for start in range(0, len(texts), batch_size):
        yield model.tokenize(texts[start:start + batch_size], max_length=max_length)
