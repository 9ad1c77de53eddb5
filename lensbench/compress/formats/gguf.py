"""`gguf`: llama.cpp's file, one GGML type per tensor, dropped blocks gone and the rest renumbered.

The header and the tensor list come from `gguf_header`: copied from the GGUF file the model was loaded
from, or built from a Hugging Face model's config and tokenizer. Llama's q/k rows are permuted back to
llama.cpp's rotary layout (a row permutation: the per-row blocks quantise the same).

Types: a weight the plan quantises with the `gguf` scheme gets `gpu.ggml.ggml_type(bits, row length)`
(Q8_0/Q6_K/Q5_K/Q4_K/Q3_K/Q2_K, with the documented fallbacks for rows that are not multiples of 256),
rounded to nearest by the type's quantiser, or, for a `gptq` entry, the bytes GPTQ rounded onto the type's
grid (`compress.gptq.gptq_ggml`, run by `compress` on calibration text before the writer).
A tensor the plan leaves alone keeps the source file's type when that type holds its values exactly
(checked by a round trip, as for a dequantised Q4_1 file), and is otherwise stored at `dtype` (the
model's own by default); norms and other vectors stay F32.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...errors import PlanError
from ...gpu import ggml
from ..apply import packed_weight
from .registry import kept_layers, refuse_sublayers, register
from .gguf_header import GGUFHeader
import gguf
import torch

_BLOCK = re.compile(r"^blk\.(\d+)\.(.*)$")
# llama.cpp stores these families' RMSNorm weights as 1 + w (their norms scale by 1 + w); transformers' GGUF reader
# subtracts the 1 again (its Gemma2TensorProcessor, NemotronTensorProcessor), so the writer adds it back
NORM_PLUS_ONE = ("gemma2", "gemma3", "nemotron")


def source_gguf(model) -> Path | None:
    """The .gguf file the model was loaded from, or None for a Hugging Face model."""
    src = model.card.get("source", "")
    if model.card.get("format") == "gguf" and str(src).endswith(".gguf") and Path(src).is_file():
        return Path(src)
    return None


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's q/k row order -> llama.cpp's (the inverse of what transformers undoes on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register("gguf")
def write_gguf(model, plan, staging: Path, dtype) -> dict:

    refuse_sublayers(model, plan, "GGUF")
    targets = plan.quant_targets(model)
    other = sorted(n for n, s in targets.items() if s.scheme != "gguf")
    if other:
        raise PlanError(f"the plan quantises {other[0]} (and {len(other) - 1} more) with the "
                        f"{targets[other[0]].scheme} scheme, which GGUF does not store: make the plan with "
                        f"--scheme gguf (bits 2, 3, 4, 5, 6, 8 become Q2_K ... Q6_K, Q8_0)")
    kept = kept_layers(model, plan)
    src = source_gguf(model)
    header = GGUFHeader.from_file(src, model) if src else GGUFHeader.from_hf(model)
    renumber = {old: new for new, old in enumerate(kept)}
    state = model.module.state_dict()
    cfg = model.module.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)}
    stored = dtype or model.module.dtype
    fallback = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[stored]

    out = staging / f"{Path(model.name).stem}.gguf"
    writer = gguf.GGUFWriter(str(out), header.arch)
    header.write_fields(writer, kept)
    tensors, n_weights, n_bits = [], 0, 0.0
    for old, hf, source_type in header.tensors:
        m = _BLOCK.match(old)
        if m and int(m.group(1)) not in renumber:
            continue
        name = f"blk.{renumber[int(m.group(1))]}.{m.group(2)}" if m else old
        w = state[hf].detach().to(torch.float32).cpu().numpy()
        if header.arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            w = w + np.float32(1)
        kind = m.group(2).rsplit(".", 1)[0] if m else ""
        if header.permute and kind in heads and w.ndim == 2:
            w = _permute(w, heads[kind])
        spec = targets.get(hf.removesuffix(".weight")) if hf.endswith(".weight") else None
        rounded = _gptq(model, hf, spec)
        if rounded is not None:
            qtype = rounded.qtype
        elif spec is not None:
            qtype = ggml.ggml_type(spec.bits, w.shape[-1])
        elif w.ndim < 2:
            qtype = "F32"
        elif dtype is None and source_type and _holds_exactly(w, source_type):
            qtype = source_type
        else:
            qtype = fallback
        if rounded is None:
            data = _encode(w, qtype)
        else:  # rows of blocks permute like rows of values
            data = _permute(rounded.data, heads[kind]) if header.permute and kind in heads else rounded.data
        if qtype in ("F32", "F16"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
        bpw = 8 * data.nbytes / w.size
        tensors.append({"name": name, "type": qtype, "shape": list(w.shape), "bits_per_weight": round(bpw, 4)})
        if w.ndim == 2:
            n_weights += w.size
            n_bits += bpw * w.size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return {"file": out.name, "architecture": header.arch, "header_from": str(src) if src else "transformers config",
            "layers_kept": kept, "tensor_types": counts, "bits_per_weight": n_bits / n_weights, "tensors": tensors,
            "note": "bits_per_weight: over the 2-D weights, scales included (the file's real cost)"}


def _gptq(model, hf: str, spec) -> ggml.GGMLWeight | None:
    """The bytes GPTQ rounded onto the weight's GGML grid (left by `compress`'s calibration pass), or None for a
    round-to-nearest entry."""
    if spec is None or spec.method == "rtn":
        return None
    name = hf.removesuffix(".weight")
    return packed_weight(model, name, model.module.get_submodule(name).weight, spec)


def _holds_exactly(w: np.ndarray, qtype: str) -> bool:
    if qtype in ("F32",):
        return True
    try:
        return bool(np.array_equal(ggml.roundtrip(w, qtype), w))
    except (KeyError, ValueError, ggml.GGMLError, NotImplementedError):
        return False


def _encode(w: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "F32":
        return np.ascontiguousarray(w, np.float32)
    if qtype == "F16":
        return np.ascontiguousarray(w, np.float16)
    return ggml.quantize(w, qtype)
