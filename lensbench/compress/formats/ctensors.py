"""`compressed-tensors`: the pack-quantized weight-only checkpoint that vLLM, llm-compressor and
transformers (with the compressed-tensors package) load.

Written with the `compressed-tensors` library: each quantised linear's dequantised weight and
lensbench's own scales go through its `PackedQuantizationCompressor`, which recovers exactly
lensbench's integer codes (the weight lies on the grid) and packs them into int32; the config is
its `QuantizationConfig`, one group per distinct (bits, group size) targeting the exact module
names, with every linear left dense in `ignore`. The grid must be the symmetric one (`--scheme
sym`), and the group size must divide every quantised row (the library has no shorter last group).
Blocks are dropped and renumbered as in `hf`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..apply import apply, packed_weight
from ...errors import PlanError
from ...units import is_conv1d, templates_of
from .registry import kept_layers, refuse_sublayers, register
from .hf import pruned_config, save_tokenizer, state_dict
from safetensors.torch import save_file


def _check(model, targets) -> None:
    if not targets:
        raise PlanError("this plan quantises nothing; save it with --format hf")
    bad = sorted(n for n, s in targets.items() if s.scheme != "sym")
    if bad:
        raise PlanError(f"the plan quantises {bad[0]} (and {len(bad) - 1} more) with the {targets[bad[0]].scheme} "
                        f"scheme; compressed-tensors stores the symmetric grid: make the plan with --scheme sym")
    mixed = sorted(n for n, s in targets.items() if s.group_bits)
    if mixed:
        raise PlanError(f"the plan gives {mixed[0]} (and {len(mixed) - 1} more) per-group bit-widths (bits-baq), which "
                        f"compressed-tensors cannot store (one width per tensor): save it with --format hf")
    root = model.module
    for name, spec in targets.items():
        module = root.get_submodule(name)
        if not isinstance(module, nn.Linear) or is_conv1d(module):
            raise PlanError(f"{name} is a {type(module).__name__}; the pack-quantized format holds nn.Linear weights "
                            f"only: leave it out of the plan or save with --format hf")
        k = module.in_features
        if k % spec.group_size:
            fits = [g for g in (128, 64, 32, 16, 8) if k % g == 0 and g < spec.group_size]
            raise PlanError(f"group size {spec.group_size} does not divide {name}'s {k} inputs, and compressed-tensors "
                            f"has no shorter last group: make the plan with --group-size {fits[0] if fits else k}")


@register("compressed-tensors")
def write_compressed_tensors(model, plan, staging: Path, dtype) -> dict:
    # heavy: compressed-tensors, only for that format
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    # heavy: compressed-tensors, only for that format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    refuse_sublayers(model, plan, "compressed-tensors")
    targets = plan.quant_targets(model)
    _check(model, targets)
    kept = kept_layers(model, plan)
    rename = _renamer(model, kept)
    root = model.module
    scales = {name: packed_weight(model, name, root.get_submodule(name).weight, s).scales  # RTN or GPTQ's
              for name, s in targets.items()}
    stored = dtype or model.module.dtype
    groups: dict[tuple[int, int], list[str]] = {}
    for name, s in targets.items():
        groups.setdefault((s.bits, s.group_size), []).append(rename(name))
    schemes = {(b, g): QuantizationScheme(targets=sorted(names), weights=QuantizationArgs(
        num_bits=b, type="int", symmetric=True, strategy="group", group_size=g)) for (b, g), names in groups.items()}
    with apply(model, plan, packed=False):
        tensors = state_dict(model.module, dtype)
        for name, s in targets.items():
            new = rename(name)
            module = {"weight": tensors.pop(f"{new}.weight").float(), "weight_scale": scales[name].float(),
                      "weight_zero_point": torch.zeros_like(scales[name], dtype=torch.int8)}
            packed = PackedQuantizationCompressor.compress(module, schemes[(s.bits, s.group_size)])
            packed["weight_scale"] = packed["weight_scale"].to(stored)  # float16 scales: exact in any of the dtypes
            tensors.update({f"{new}.{k}": v.contiguous() for k, v in packed.items()})
        dense = sorted(n for n, m in root.named_modules() if isinstance(m, nn.Linear) and n not in targets)
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config = pruned_config(model, kept)
    config.dtype = stored
    qc = QuantizationConfig(config_groups={f"group_{i}": sch for i, sch in enumerate(schemes.values())},
                            format="pack-quantized", quantization_status="compressed",
                            ignore=[rename(n) for n in dense if rename(n) is not None])
    config.quantization_config = qc.to_dict()
    config.save_pretrained(staging)
    save_tokenizer(model, staging)
    n_weights = sum(root.get_submodule(n).weight.numel() for n in targets)
    bits = sum(s.bits * root.get_submodule(n).weight.numel() for n, s in targets.items())
    scale_bits = sum(scales[n].numel() for n in targets) * torch.finfo(stored).bits
    return {"layers_kept": kept, "layout": "compressed-tensors pack-quantized", "dtype": str(stored).split(".")[-1],
            "groups": {f"int{b}/g{g}": len(v) for (b, g), v in groups.items()},
            "bits_per_weight": (bits + scale_bits) / n_weights,
            "note": "bits_per_weight: over the quantised linears, scales included"}


def _renamer(model, kept: list[int]):
    """Old module name -> its name in the saved model (blocks renumbered), None for a dropped block."""
    block = templates_of(model.adapter)["block"]
    rx = re.compile("^" + re.escape(block).replace(re.escape("{i}"), r"(\d+)") + r"(\..*)?$")
    renumber = {old: new for new, old in enumerate(kept)}

    def rename(name: str) -> str | None:
        m = rx.match(name)
        if not m:
            return name
        i = int(m.group(1))
        if i not in renumber:
            return None
        return block.format(i=renumber[i]) + (m.group(2) or "")
    return rename

