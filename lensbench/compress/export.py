"""A mixed-precision Plan in the formats other quantisation tools load.

Each exporter turns the plan's per-module bit-widths (resolved against the model, so patterns and
block names become the concrete linear layers) into that tool's own configuration. What the tool
then does is its own quantisation, not lensbench's: the *allocation* carries over, the rounding
algorithm is the target's. Registered in EXPORTERS; `lensbench export PLAN --format NAME`.

* `torchao` — a JSON description of `FqnToConfig({fqn: IntxWeightOnlyConfig(weight_dtype=torch.intB,
  granularity=PerGroup(G), mapping_type=MappingType.ASYMMETRIC)})`, plus the few lines of Python that
  build it (written next to it as text, never executed by lensbench). `quantize_(model, config)`
  then replaces each listed linear's weight with torchao's group-wise asymmetric int-B tensor;
  unlisted modules stay as they are.
* `llm-compressor` — a recipe (YAML) with one `QuantizationModifier` config group per distinct
  (bits, group size), targeting the exact module names with `re:^name$` patterns; weights
  `{num_bits, type: int, symmetric: false, strategy: group, group_size}`. `oneshot(model, recipe=...)`
  quantises with min-max observers (swap in `GPTQModifier` for GPTQ); `ignore: [lm_head]` unless the
  plan quantises the head. The result saves as compressed-tensors, which vLLM loads.
* `gptqmodel` — a `quantize_config.json`-style dict: the most common (bits, group size) as the base,
  `dynamic` rules `"+:^name$": {"bits": b, "group_size": g}` for modules that differ and
  `"-:^name$": {}` for block linears the plan leaves unquantised (GPTQModel skips those). GPTQModel
  runs GPTQ with these per-module settings; vLLM reads the same `dynamic` overrides.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import yaml

from ..atomic import write_json, write_text
from ..errors import PlanError
from ..simquant import block_linears
from .plan import Plan

EXPORTERS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        EXPORTERS[name] = fn
        return fn
    return deco


def export(plan: Plan, model, fmt: str) -> tuple[object, str]:
    """(document, file suffix) of `plan` for tool `fmt`; the plan is checked against `model` first."""
    if fmt not in EXPORTERS:
        raise PlanError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORTERS)}")
    plan.resolve(model)
    targets = plan.quant_targets(model)
    if not targets:
        raise PlanError("this plan quantises nothing; the exports describe mixed-precision plans (make one with "
                        "lensbench plan --policy bits-rank|bits-dp|bits-bisect)")
    schemes = {s.scheme for s in targets.values()}
    if "gguf" in schemes or len(schemes) > 1:
        raise PlanError("this plan uses the gguf scheme or mixes schemes, which these tools' configs cannot "
                        "express; save it with lensbench compress --format gguf")
    if any(s.group_bits for s in targets.values()):
        raise PlanError("this plan gives linears per-group bit-widths (bits-baq), which these tools' configs cannot "
                        "express (one width per layer); save it with lensbench compress --format hf")
    if plan.units():
        raise PlanError("this plan also removes layers, which these quantisation tools cannot express; export a "
                        "plan that only quantises")
    return EXPORTERS[fmt](plan, model, targets)


def _head_name(model) -> str | None:
    head = model.module.get_output_embeddings()
    return next((n for n, m in model.module.named_modules() if m is head), None)


def _mapping(scheme: str) -> str:
    return "SYMMETRIC" if scheme == "sym" else "ASYMMETRIC"


@register("torchao")
def to_torchao(plan: Plan, model, targets: dict[str, tuple[int, int]]):
    configs = {name: {"_type": "IntxWeightOnlyConfig", "weight_dtype": f"torch.int{b}",
                      "granularity": {"_type": "PerGroup", "group_size": g}, "mapping_type": _mapping(s)}
               for name, (b, g, s) in targets.items()}
    lines = ["import torch",
             "from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig, quantize_",
             "from torchao.quantization.granularity import PerGroup",
             "from torchao.quantization.quant_primitives import MappingType",
             "", "config = FqnToConfig({"]
    lines += [f"    {name!r}: IntxWeightOnlyConfig(weight_dtype=torch.int{b}, granularity=PerGroup({g}), "
              f"mapping_type=MappingType.{_mapping(s)})," for name, (b, g, s) in targets.items()]
    lines += ["})", "quantize_(model, config, filter_fn=None)"]
    return {"tool": "torchao", "FqnToConfig": configs, "python": "\n".join(lines),
            "source_plan": plan.policy}, "torchao.json"


@register("llm-compressor")
def to_llm_compressor(plan: Plan, model, targets: dict[str, tuple[int, int]]):
    groups: dict[tuple[int, int], list[str]] = {}
    for name, spec in targets.items():
        groups.setdefault(spec, []).append(name)
    config_groups = {
        f"group_{i}": {"targets": [f"re:^{_escape(n)}$" for n in names],
                       "weights": {"num_bits": b, "type": "int", "symmetric": sch == "sym", "strategy": "group",
                                   "group_size": g}}
        for i, ((b, g, sch), names) in enumerate(sorted(groups.items()))}
    head = _head_name(model)
    modifier = {"config_groups": config_groups}
    if head and head not in targets:
        modifier["ignore"] = [head]
    return {"quant_stage": {"quant_modifiers": {"QuantizationModifier": modifier}}}, "recipe.yaml"


@register("gptqmodel")
def to_gptqmodel(plan: Plan, model, targets: dict[str, tuple[int, int]]):
    (base_bits, base_group, scheme), _ = Counter(targets.values()).most_common(1)[0]
    dynamic = {f"+:^{_escape(n)}$": {"bits": b, "group_size": g}
               for n, (b, g, _) in targets.items() if (b, g) != (base_bits, base_group)}
    ad = model.adapter
    for i in range(ad.n_layers):
        for rel in block_linears(model):
            name = f"{ad.block_path(i)}.{rel}"
            if name not in targets:
                dynamic[f"-:^{_escape(name)}$"] = {}
    head = _head_name(model)
    return {"bits": base_bits, "group_size": base_group, "sym": scheme == "sym", "desc_act": False,
            "lm_head": bool(head and head in targets), "dynamic": dynamic, "quant_method": "gptq"}, \
        "quantize_config.json"


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def write(doc, path) -> None:
    """Write an export atomically: YAML for recipes, JSON otherwise (plus the torchao Python snippet)."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        write_text(path, yaml.safe_dump(doc, sort_keys=False))
    else:
        write_json(path, doc)
        if isinstance(doc, dict) and "python" in doc:
            write_text(path.with_suffix(".py"), "# Build the torchao config for this plan (model = your HF model)\n"
                       + doc["python"] + "\n")
