"""Quantisation simulated in place, for measurements that try many candidates (sensitivity scans,
allocation searches): each targeted weight is overwritten with its dequantised packed value and
put back afterwards. The network computes what the packed model computes (up to float summation
order; tested), without swapping modules — but it saves no bytes and runs no faster, so bytes and
speed are only ever reported from `apply`, which runs the packed weights.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
from torch import nn

from .gpu import ggml
from .gpu.mixed import quantize_mixed
from .gpu.quant import quantize
from .gpu.reference import dequantize
from .model import Model
from .units import is_conv1d


class Grid(NamedTuple):
    """A quantisation grid: bit-width, group size, scheme ("asym", "sym" or "gguf"); a plan's `Quant` action
    has the same three fields and is accepted wherever a Grid is."""

    bits: int
    group_size: int = 128
    scheme: str = "asym"


def block_linears(model: Model) -> list[str]:
    """Names, relative to a block, of the linear layers in every block (those of block 0)."""
    block = model.adapter.blocks[0]
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def linear_params(model: Model, layer: int) -> dict[str, int]:
    """{relative name: weight elements} of block `layer`'s linear layers."""
    block = model.adapter.blocks[layer]
    return {n: block.get_submodule(n).weight.numel() for n in block_linears(model)}


def linear_inputs(model: Model, layer: int) -> dict[str, int]:
    """{relative name: input features} of block `layer`'s linear layers (the row length a format packs)."""
    block = model.adapter.blocks[layer]
    return {n: int(block.get_submodule(n).weight.shape[0 if is_conv1d(block.get_submodule(n)) else 1])
            for n in block_linears(model)}


def dequantised(weight: torch.Tensor, spec: Grid, conv1d: bool = False) -> torch.Tensor:
    """The values a reader of the quantised weight computes with, in the weight's dtype and layout."""
    w = weight.T if conv1d else weight
    if spec.scheme == "gguf":
        arr = w.detach().to(torch.float32).cpu().numpy()
        q = torch.from_numpy(ggml.roundtrip(arr, ggml.ggml_type(spec.bits, arr.shape[1])))
    elif getattr(spec, "group_bits", ()):  # a plan's Quant with one width per input group (BAQ)
        q = quantize_mixed(w, spec.group_bits, spec.group_size, spec.scheme == "sym").dequantize()
    else:
        q = dequantize(quantize(w, spec.bits, spec.group_size, symmetric=spec.scheme == "sym"))
    q = q.to(device=weight.device, dtype=weight.dtype)
    return q.T if conv1d else q


@contextlib.contextmanager
@torch.no_grad()
def simulated(model: Model, targets: dict[str, tuple], cache: dict | None = None) -> Iterator[Model]:
    """Inside the block, the weights named in `targets` ({module name: Grid, Quant or (bits, group
    size[, scheme])}) hold their quantised values. `cache` ({(name, spec): dense tensor}) avoids quantising again."""
    root = model.module
    saved = []
    try:
        for name, spec in targets.items():
            spec = Grid(*spec) if isinstance(spec, tuple) else spec
            module = root.get_submodule(name)
            key = (name, spec)
            q = cache.get(key) if cache is not None else None
            if q is None:
                q = dequantised(module.weight, spec, is_conv1d(module))
                if cache is not None:
                    cache[key] = q
            saved.append((module.weight, module.weight.detach().clone()))
            module.weight.copy_(q)
        yield model
    finally:
        for w, original in saved:
            w.copy_(original)
