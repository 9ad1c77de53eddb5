"""Layer by layer: a model whose weights stay in their safetensors files and are read in only while the module
that owns them runs, so a model larger than memory can be captured and profiled.

`build(path, dtype)` makes the model's skeleton (parameters on the `meta` device, no memory; buffers real),
maps every parameter to its bytes in the folder's safetensors files (read from the files' headers, no data),
and hooks every module that holds parameters of its own: before its forward the parameters are read from the
file (`os.pread` into fresh memory, cast to the dtype) and after it they are dropped again. At any moment the
weights in memory are those of the one module running (an embedding, a linear, a norm) plus whatever code
holds `resident(module)` open, e.g. the LM head while a scan scores against it. Every forward reads the
weights again; the OS page cache keeps that fast while the files fit in it, and a model that does not fit is
read from disk (what GPTQ-style sequential pipelines and accelerate's disk offload do too).

Code that reads weights outside a forward (an SVD of the heads, quantising in place) does not work on such a
model: analyses declare whether they run on it (`Analyzer.layer_by_layer`), and the others are refused.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import LensbenchError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are: file, absolute offset, byte length, its dtype and shape there."""

    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_index(folder: Path) -> dict[str, Stored]:
    """Every tensor in the folder's *.safetensors files, from their headers (the data is not read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LensbenchError(f"{folder} has no .safetensors files: layer-by-layer mode reads weights from "
                             f"safetensors; save the model with save_pretrained (safe_serialization) first")
    index: dict[str, Stored] = {}
    for path in files:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise LensbenchError(f"{path} is truncated (no safetensors header): download or save it again")
            (size,) = struct.unpack("<Q", head)
            try:
                header = json.loads(fh.read(size))
            except ValueError:
                raise LensbenchError(f"{path} has a damaged safetensors header: download or save it again") from None
        start = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise LensbenchError(f"{path}: tensor {name} has dtype {info['dtype']}, which layer-by-layer "
                                     f"mode cannot read (it reads {', '.join(_DTYPES)})")
            begin, end = info["data_offsets"]
            index[name] = Stored(str(path), start + begin, end - begin, _DTYPES[info["dtype"]], tuple(info["shape"]))
    return index


def read(stored: Stored, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor from its file into fresh memory (no mapping of the file stays behind), cast to `dtype`."""
    raw = torch.empty(stored.nbytes, dtype=torch.uint8)
    fd = os.open(stored.file, os.O_RDONLY)
    try:
        got = os.preadv(fd, [raw.numpy()], stored.offset)
    finally:
        os.close(fd)
    if got != stored.nbytes:
        raise LensbenchError(f"{stored.file} is shorter than its header says: download or save it again")
    tensor = raw.view(stored.dtype).reshape(stored.shape)
    return tensor if dtype is None or dtype == stored.dtype or not dtype.is_floating_point else tensor.to(dtype)


class _Source:
    """An offloaded parameter's file location, target dtype, and how many holders keep it in memory."""

    def __init__(self, stored: Stored, dtype: torch.dtype):
        self.stored, self.dtype, self.holders = stored, dtype, 0


_SOURCE = "_lensbench_source"  # the attribute of an offloaded parameter that holds its _Source


def _source(p: nn.Parameter | None) -> _Source | None:
    return getattr(p, _SOURCE, None)


def is_offloaded(module: nn.Module) -> bool:
    return any(_source(p) is not None for p in module.parameters())


def _hold(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    held = []
    for p in params:
        source = _source(p)
        if source is None:
            continue
        if source.holders == 0:
            p.data = read(source.stored, source.dtype)
        source.holders += 1
        held.append(p)
    return held


def _release(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        source = _source(p)
        source.holders -= 1
        if source.holders == 0:
            p.data = _placeholder(p.shape, p.dtype)


@contextlib.contextmanager
def resident(*modules: nn.Module | nn.Parameter) -> Iterator[None]:
    """The given modules' (or parameters') weights in memory for the duration; a no-op for a model in memory."""
    params: list[nn.Parameter] = []
    for m in modules:
        params.extend([m] if isinstance(m, nn.Parameter) else m.parameters())
    held = _hold(dict.fromkeys(params))  # tied weights once
    try:
        yield
    finally:
        _release(held)


def _placeholder(shape, dtype: torch.dtype) -> torch.Tensor:
    """What an offloaded parameter holds while it is not in memory: its shape and dtype on the CPU, one NaN
    behind every element (a stride-0 view of one value), so code that reads it unawares gets NaN, not zeros."""
    return torch.full((1,), float("nan"), dtype=dtype).expand(shape)


def _before(module: nn.Module, args) -> None:
    module._lensbench_held = _hold(module._parameters.values())


def _after(module: nn.Module, args, output) -> None:
    _release(module.__dict__.pop("_lensbench_held", ()))


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on `meta` (no memory) and their buffers for real (rotary
    frequencies and the like are computed at construction and are not in the weight files)."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _as_named_in(module: nn.Module, index: dict[str, Stored], folder: Path) -> dict[str, Stored]:
    """The files' tensors under the names the module gives them: transformers renames checkpoint keys while
    loading (a base model's prefix added or stripped, legacy names such as GPT-NeoX's embed_out), and its own
    renaming is applied here; a key it would merge or split (experts stacked into one tensor) is refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping  # heavy: transformers, at load
    from transformers.core_model_loading import (  # heavy: transformers, at load
        WeightConverter, WeightRenaming, rename_source_key)

    transforms = get_model_conversion_mapping(module)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys(module.state_dict(keep_vars=True))
    renamed = {}
    for key, stored in index.items():
        name, converter = rename_source_key(key, renamings, converters, module.base_model_prefix, names)
        if converter is not None:
            raise LensbenchError(f"{folder}: weight {key} is converted while loading (transformers merges it as "
                                 f"{converter}), which layer-by-layer mode does not do: load the model whole")
        renamed[name] = stored
    return renamed


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _map_big_allocations() -> None:
    """glibc serves an allocation below its mmap threshold from the heap and raises that threshold to the size of
    every mapped block freed (up to 32 MiB), so weights read in and dropped in turn end up in a heap that keeps
    their pages; with the threshold fixed at 1 MiB every weight and activation that size is mapped and handed
    back when freed. Process-wide, glibc only, set once a layer-by-layer model is built."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def build(model_class, config, folder: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model of `model_class` for `config`, its weights left in `folder`'s safetensors files (see the module
    docstring); `dtype` None keeps each tensor's stored float dtype, as `from_pretrained(dtype="auto")` does."""
    index = read_index(folder)
    _map_big_allocations()
    with _parameters_on_meta():
        module = model_class.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    module.tie_weights()
    index = _as_named_in(module, index, folder)
    stand_ins: dict[int, nn.Parameter] = {}  # a meta parameter's CPU stand-in, one per tied group
    named = list(module.named_parameters(remove_duplicate=False))
    found = {name: index.get(name) for name, _ in named}
    saved = {id(param) for name, param in named if found[name] is not None}
    for name, param in named:
        stored = found[name]
        if stored is None:
            if id(param) in saved:  # tied to a weight saved under another name
                continue
            raise LensbenchError(f"{folder}: no weight {name} in its safetensors files (the model's class "
                                 f"{model_class.__name__} expects it); the folder is incomplete")
        if stored.shape != tuple(param.shape):
            raise LensbenchError(f"{folder}: weight {name} has shape {list(stored.shape)} in the file but "
                                 f"{list(param.shape)} in the model; the config and the weights disagree")
        want = dtype if dtype is not None else stored.dtype
        stand_in = stand_ins.setdefault(id(param), nn.Parameter(_placeholder(param.shape, want), requires_grad=False))
        setattr(stand_in, _SOURCE, _Source(stored, want))
    for name, buf in module.named_buffers():
        if name in index:  # a persistent buffer stored with the weights
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner).register_buffer(leaf, read(index[name], buf.dtype))
    for sub in module.modules():
        own = [name for name, param in sub._parameters.items() if param is not None]
        for name in own:
            sub._parameters[name] = stand_ins[id(sub._parameters[name])]
        if own:  # its weights are read in for its forward and dropped after
            sub.register_forward_pre_hook(_before)
            sub.register_forward_hook(_after, always_call=True)
    return module


def piece_bytes(module: nn.Module) -> int:
    """Bytes of the largest set of weights one module holds at a time (its own parameters, tied ones once)."""
    best = 0
    for sub in module.modules():
        own = dict.fromkeys(p for p in sub._parameters.values() if p is not None)
        best = max(best, sum(p.numel() * p.element_size() for p in own))
    return best
