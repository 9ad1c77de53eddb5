"""Loading a GGUF file straight into packed modules (`lb.load("model.gguf", packed=True)`).

A GGUF file's weights are already quantised, yet `lb.load` of a .gguf dequantises them to floats (through
transformers, cached as a safetensors folder). Here each weight stored in a type whose grid is one float16 scale
(and low end) per 32 values — Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (`gpu.ggml.read`) — becomes a `QuantLinear` (or a
`QuantEmbedding`, with a tied head sharing it) holding the file's codes, scales and low ends: the packed format
(`gpu.quant`) holds that grid exactly, so the packed model computes with the file's own values, in a fraction of
the float model's memory. Everything else (norms, biases, the K-quants, whose sub-block scales are a float16
times a 6- or 8-bit integer, which one float16 scale cannot hold) is read as floats from the converted copy.

Which GGUF tensor is which module comes from `gguf`'s name map of the file's architecture; llama-family files
store attn_q/attn_k rows permuted for llama.cpp's rotary layout, which transformers undoes, and so is undone here
(rows only: a row's groups are untouched). Each packed weight is checked against the converted copy's float
weight, value for value, before it replaces the module; a weight that does not match (an architecture whose
conversion transforms it otherwise) stays dense, and the model's card counts both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import adapter_for
from .errors import LensbenchError
from .gguf_table import Table, read_table
from .gpu import ggml, runtime
from .gpu.modules import QuantEmbedding, QuantLinear
from .gpu.quant import pack
from .model import Model, describe
from .offload import read, read_index
from .packed_load import fill_dense, meta_model, replace_module
from .saved import tied_head_key

PERMUTED_ARCHS = ("llama",)  # whose GGUF conversion permutes attn_q/attn_k rows (llama.cpp's convert_hf_to_gguf)


def load_gguf_packed(path: Path, converted: Path, auto_class, *, dtype: torch.dtype | None = None,
                     device: str = "cpu") -> Model:
    """`path`'s model with every weight in a 32-value GGUF type packed (module docstring); `converted` is the
    float copy `lensbench.load` made of it (config, tokenizer, the tensors left dense)."""
    import gguf  # optional: gguf (with transformers' GGUF support), only for GGUF files
    from transformers import AutoConfig, AutoTokenizer  # heavy: transformers, imported when a model is loaded

    if device != "cpu":
        raise LensbenchError(f"packed loading runs on the CPU, not {device}: drop the device, or load without "
                             f"packed=True")
    config = AutoConfig.from_pretrained(converted)
    dtype = dtype or torch.float32
    module = meta_model(config, auto_class, dtype)
    table = read_table(path)  # the tensor table only: gguf.GGUFReader builds every metadata value (`gguf_table`)
    arch = table.architecture
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_id is None:
        raise LensbenchError(f"{path}: gguf {gguf.__version__} has no architecture {arch!r}: load it without "
                             f"packed=True")
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    # the converted copy is read a tensor at a time into fresh memory (`offload.read`), not mapped: a mapping of its
    # float weights, read whole for the checks, would count in the process's memory while it loads
    where = read_index(converted)
    packed, kept = _pack_modules(module, names, table, where, arch, config, dtype)
    dense = {key: read(stored, dtype if stored.dtype.is_floating_point else None) for key, stored in where.items()
             if key.rpartition(".")[0] not in packed}
    fill_dense(module, dense, converted, fix=f"delete {converted} so that lensbench converts {path.name} again")
    runtime.install(module)  # the thread policy and fused calls that `apply` and `convert` give a model
    module.eval()
    info = {"name": path.stem, "source": str(path.resolve()), "format": "gguf, packed", "packed_weights": len(packed),
            "dense_weights": kept, **describe(module)}
    return Model(module, AutoTokenizer.from_pretrained(converted), adapter_for(module), info)


def _pack_modules(module: nn.Module, names, table: Table, where: dict, arch: str, config, dtype):
    """Swap every linear and embedding whose GGUF tensor is in a readable type and reproduces the converted float
    weight exactly; returns ({packed module name}, {why a weight stays dense (its GGUF type): count})."""
    packed: set[str] = set()
    kept: dict[str, int] = {}
    emb = module.get_input_embeddings()
    head = module.get_output_embeddings()
    tied = tied_head_key(module)
    shared = None  # the embedding's packed table, which a tied head reuses
    for name, sub in list(module.named_modules()):
        if sub is head and tied:
            continue  # done with the embedding
        is_table = sub is emb
        if not (is_table or isinstance(sub, nn.Linear)):
            continue
        gname = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        t = table.tensors.get(gname or "")
        key = f"{name}.weight"
        why = _unreadable(t, key, where, sub if is_table else None)
        if why:
            kept[why] = kept.get(why, 0) + 1
            continue
        qtype = t.type
        k, n = t.shape  # GGUF order: the inputs first
        codes, scale, low, bits = ggml.read(table.data(t), qtype, (n, k))
        role = gname.split(".")[-2]
        if arch in PERMUTED_ARCHS and role in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if role == "attn_q" else config.num_key_value_heads
            order = _unpermuted_rows(n, heads)
            codes, scale, low = codes[order], scale[order], low[order]
        if not (np.isfinite(low).all() and _same_values(codes, scale, low, read(where[key], torch.float32).numpy())):
            why = f"{qtype}, not the converted copy's values"
            kept[why] = kept.get(why, 0) + 1
            continue
        pw = pack(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(scale), torch.from_numpy(low),
                  bits, 32, (n, k))
        if is_table:
            new: nn.Module = QuantEmbedding(pw, dtype)
            shared = pw
        else:
            bias = read(where[f"{name}.bias"], dtype) if f"{name}.bias" in where else None
            new = QuantLinear(pw, bias, dtype)
        replace_module(module, name, new)
        packed.add(name)
    if tied and shared is not None:
        head_name = tied.rpartition(".")[0]
        replace_module(module, head_name, QuantLinear(shared, None, dtype))
        packed.add(head_name)
    return packed, kept


def _same_values(codes: np.ndarray, scale: np.ndarray, low: np.ndarray, expect: np.ndarray, rows: int = 1024) -> bool:
    """Whether the grid's values (code * scale + low, groups of 32) equal `expect` exactly, a block of rows at a time
    (the float temporaries of a whole embedding table would be several times its packed bytes)."""
    n, k = expect.shape
    for a in range(0, n, rows):
        b = min(n, a + rows)
        values = (codes[a:b].reshape(b - a, -1, 32) * scale[a:b, :, None] + low[a:b, :, None]).reshape(b - a, k)
        if not np.array_equal(values, expect[a:b]):
            return False
    return True


def _unreadable(t, key: str, where: dict, embedding: nn.Module | None) -> str | None:
    """Why a module's GGUF tensor `t` stays dense (its type, a scaled embedding, no tensor), or None."""
    if t is None or key not in where:
        return "no GGUF tensor"
    if t.type not in ggml.READABLE:
        return t.type
    if embedding is not None:
        try:
            QuantEmbedding.check(embedding)
        except LensbenchError:
            return f"{t.type}, an embedding that changes its lookup"
    return None


def _unpermuted_rows(n: int, heads: int) -> np.ndarray:
    """The GGUF row each output row of a q/k projection is stored at: llama.cpp's converter stores head h's rows
    i and i + dim (its rotary halves, dim = head size / 2) as rows 2i and 2i + 1; transformers reads them back so."""
    dim = n // heads // 2
    return np.arange(n).reshape(heads, dim, 2).swapaxes(1, 2).reshape(n)
