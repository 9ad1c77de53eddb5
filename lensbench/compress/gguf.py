"""`gguf`: llama.cpp's file, one GGML type per tensor, dropped blocks gone and the rest renumbered.

The source's header is copied from the GGUF file the model was loaded from (architecture, tokenizer,
chat template), with `block_count` lowered and every per-layer array shortened to the kept layers;
`general.file_type` is left out because the file mixes types (llama.cpp then reads each tensor's
own type). Tensor names are the source file's, found for each Hugging Face weight through the `gguf`
package's tensor-name map; Llama's q/k rows are permuted back to llama.cpp's rotary layout.

Types: a weight the plan quantises with the `gguf` scheme gets `gpu.ggml.ggml_type(bits, row length)`
(Q8_0/Q6_K/Q5_K/Q4_K, with the documented fallbacks for rows that are not multiples of 256). A tensor
the plan leaves alone keeps the source file's type when that type holds its values exactly (checked by
a round trip, as for a dequantised Q4_1 file), and is otherwise stored at `dtype` (the model's own by
default); norms and other vectors stay F32.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import LensbenchError, PlanError
from ..gpu import ggml
from . import kept_layers, refuse_sublayers, register

PERMUTED = {"llama": ("attn_q", "attn_k")}  # archs whose q/k llama.cpp stores in its own rotary order
_BLOCK = re.compile(r"^blk\.(\d+)\.(.*)$")


def source_gguf(model) -> Path:
    src = model.card.get("source", "")
    if model.card.get("format") != "gguf" or not str(src).endswith(".gguf") or not Path(src).is_file():
        raise LensbenchError(f"{model.name} was not loaded from a .gguf file, so there is no GGUF header to keep: "
                             f"convert the Hugging Face model with llama.cpp's convert_hf_to_gguf.py, then "
                             f"compress the .gguf with this plan's lensbench profile made from it")
    return Path(src)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's q/k row order -> llama.cpp's (the inverse of what transformers undoes on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_names(model, arch: str, n_blocks: int) -> dict[str, str]:
    """{GGUF tensor name: Hugging Face parameter name} for the model's weights."""
    import gguf

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise LensbenchError(f"the gguf package has no tensor names for architecture {arch!r}")
    tmap = gguf.get_tensor_name_map(archs[arch], n_blocks)
    out = {}
    for name in model.module.state_dict():
        base, dot, suffix = name.rpartition(".")
        gg = tmap.get_name(base)
        if gg is not None:
            out[f"{gg}.{suffix}"] = name
    return out


def _value(field):
    return field.contents()


def _type_name(t) -> str:
    return t.name if hasattr(t, "name") else str(t)


@register("gguf")
def write_gguf(model, plan, staging: Path, dtype) -> dict:
    import gguf
    import torch

    refuse_sublayers(model, plan, "GGUF")
    targets = plan.quant_targets(model)
    other = sorted(n for n, s in targets.items() if s.scheme != "gguf")
    if other:
        raise PlanError(f"the plan quantises {other[0]} (and {len(other) - 1} more) with the "
                        f"{targets[other[0]].scheme} scheme, which GGUF does not store: make the plan with "
                        f"--scheme gguf (bits 4, 5, 6, 8 become Q4_K, Q5_K, Q6_K, Q8_0)")
    src = source_gguf(model)
    reader = gguf.GGUFReader(src)
    arch = _value(reader.fields["general.architecture"])
    n_src = int(_value(reader.fields[f"{arch}.block_count"]))
    kept = kept_layers(model, plan)
    renumber = {old: new for new, old in enumerate(kept)}
    to_hf = _hf_names(model, arch, n_src)
    state = model.module.state_dict()
    cfg = model.module.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)}
    fallback = {None: "F32", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    if dtype is None and model.module.dtype != torch.float32:
        fallback = {torch.float16: "F16", torch.bfloat16: "BF16"}[model.module.dtype]

    out = staging / f"{Path(model.name).stem}.gguf"
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        val, vtype = _value(field), field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if key == f"{arch}.block_count":
            val = len(kept)
        elif sub is not None and key.startswith(arch + ".") and len(val) == n_src:
            val = [val[i] for i in kept]
        writer.add_key_value(key, val, vtype, sub_type=sub)

    tensors, n_weights, n_bits = [], 0, 0.0
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) not in renumber:
            continue
        name = f"blk.{renumber[int(m.group(1))]}.{m.group(2)}" if m else t.name
        hf = to_hf.get(t.name)
        if hf is None:
            raise LensbenchError(f"{src.name} holds {t.name}, which has no weight in the loaded model; this "
                                 f"architecture is not supported for GGUF output yet")
        w = state[hf].detach().to(torch.float32).cpu().numpy()
        kind = m.group(2).rsplit(".", 1)[0] if m else ""
        if kind in PERMUTED.get(arch, ()):
            w = _permute(w, heads[kind])
        spec = targets.get(hf.removesuffix(".weight")) if hf.endswith(".weight") else None
        if spec is not None:
            qtype = ggml.ggml_type(spec.bits, w.shape[-1])
        elif w.ndim < 2:
            qtype = "F32"
        elif dtype is None and _holds_exactly(w, _type_name(t.tensor_type)):
            qtype = _type_name(t.tensor_type)
        else:
            qtype = fallback
        data = _encode(w, qtype)
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
    return {"file": out.name, "architecture": arch, "layers_kept": kept, "tensor_types": counts,
            "bits_per_weight": n_bits / n_weights, "tensors": tensors,
            "note": "bits_per_weight: over the 2-D weights, scales included (the file's real cost)"}


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
