"""`hf`: a transformers checkpoint of the planned model, and lensbench's own layout for sublayer removal.

Dropped blocks leave the layer list and the rest are renumbered; `num_hidden_layers` shrinks and every
per-layer list in the config (`layer_types`, ...) keeps only the kept layers' entries. Quantised weights
are stored as the values their grid dequantises to (in float32 these are exactly what `lensbench
evaluate` computed with; for packed storage use `gguf` or `compressed-tensors`).

A plan that removes an attention or MLP alone has no stock config: the folder then holds
`lensbench-config.json` instead of `config.json` (so no stock loader silently builds the full
architecture) and `lensbench-model.json` naming the removed sublayers; `lensbench.load(DIR)` reads it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..apply import apply
from ...atomic import write_json
from ...saved import OWN_CONFIG, OWN_MANIFEST, tied_head_key
from .registry import kept_layers, register, sublayer_units
from safetensors.torch import save_file


def pruned_config(model, kept: list[int]):
    """The model's config for the kept layers: fewer layers, per-layer lists shortened to match."""
    config = copy.deepcopy(model.module.config)
    n = model.n_layers
    for key, value in list(config.to_dict().items()):
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    config.architectures = [type(model.module).__name__]  # what a reader builds (a config made in code has none)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def state_dict(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Tensors to save (a tied LM head left out), cast to `dtype`, none sharing storage."""
    out, seen = {}, set()
    skip = tied_head_key(module)
    for name, t in module.state_dict().items():
        if name == skip:
            continue
        t = t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    return out


def save_weights(module, path: Path, dtype) -> int:

    tensors = state_dict(module, dtype)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def save_tokenizer(model, path: Path) -> None:
    model.tokenizer.save_pretrained(path)
    gen = getattr(model.module, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(path)


@register("hf")
def write_hf(model, plan, staging: Path, dtype) -> dict:
    kept = kept_layers(model, plan)
    sub = sublayer_units(model, plan)
    config = pruned_config(model, kept)
    with apply(model, plan, packed=False):
        n = save_weights(model.module, staging, dtype)
    stored = dtype or model.module.dtype
    config.dtype = stored
    config.save_pretrained(staging)
    save_tokenizer(model, staging)
    record = {"layers_kept": kept, "parameters": n, "dtype": str(stored).replace("torch.", ""),
              "bits_per_weight": float(torch.finfo(stored).bits)}
    if sub:
        renumber = {old: new for new, old in enumerate(kept)}
        (staging / "config.json").rename(staging / OWN_CONFIG)
        write_json(staging / OWN_MANIFEST, {"schema": "lensbench.model/1", "class": type(model.module).__name__,
                                            "removed": [
            {"layer": renumber[u.layer], "kind": u.kind} for u in sub]})
        record["layout"] = "lensbench"
        record["note"] = (f"removes {', '.join(map(str, sub))} alone, which no stock config can express: saved in "
                          f"lensbench's own layout, load it with lensbench.load")
    else:
        record["layout"] = "transformers"
    return record
