"""Mixed-precision exports: each format names exactly the plan's modules with their bits and group
sizes in the target tool's own vocabulary; the CLI writes them; plans they cannot express are refused."""
import json
import re

import pytest
import yaml

from lensbench.errors import PlanError
from lensbench.compress.export import export
from lensbench.compress.plan import Plan
from lensbench.units import Unit
from lensbench.profiling import model_card


def run_cli(capsys, *argv):
    from lensbench.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def mixed(tiny):
    model = tiny("llama")
    card = model_card(model)
    block = card["units"]["block"]
    specs = {block.format(i=i): (4, 32) for i in range(model.n_layers)}
    specs[block.format(i=1)] = (8, 64)
    specs[f"{block.format(i=2)}.mlp.down_proj"] = (2, 32)
    return model, Plan.quantize(card, specs)


def test_torchao_lists_every_linear_with_its_config(mixed):
    model, plan = mixed
    doc, suffix = export(plan, model, "torchao")
    targets = plan.quant_targets(model)
    assert suffix == "torchao.json" and set(doc["FqnToConfig"]) == set(targets)
    for name, (b, g, _) in targets.items():
        cfg = doc["FqnToConfig"][name]
        assert cfg["weight_dtype"] == f"torch.int{b}" and cfg["granularity"]["group_size"] == g
        assert f"{name!r}: IntxWeightOnlyConfig(weight_dtype=torch.int{b}, granularity=PerGroup({g})" in doc["python"]
    compile(doc["python"], "torchao_config.py", "exec")  # valid Python (never run here)


def test_llm_compressor_recipe_groups_by_bits(mixed):
    model, plan = mixed
    doc, suffix = export(plan, model, "llm-compressor")
    text = yaml.safe_dump(doc)
    groups = yaml.safe_load(text)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["config_groups"]
    seen = {}
    for g in groups.values():
        w = g["weights"]
        assert w["type"] == "int" and w["strategy"] == "group" and w["symmetric"] is False
        for t in g["targets"]:
            name = t[len("re:^"):-1].replace("\\.", ".")
            assert re.fullmatch(t[3:], name)
            seen[name] = (w["num_bits"], w["group_size"])
    assert seen == {n: (s.bits, s.group_size) for n, s in plan.quant_targets(model).items()}


def test_gptqmodel_dynamic_overrides_differences_and_skips_the_rest(mixed):
    model, plan = mixed
    doc, _ = export(plan, model, "gptqmodel")
    targets = plan.quant_targets(model)
    assert (doc["bits"], doc["group_size"]) == (4, 32)
    for name, (b, g, _) in targets.items():
        rule = f"+:^{name.replace('.', chr(92) + '.')}$"
        if (b, g) == (4, 32):
            assert rule not in doc["dynamic"]
        else:
            assert doc["dynamic"][rule] == {"bits": b, "group_size": g}
    negatives = [k for k in doc["dynamic"] if k.startswith("-:")]
    assert not negatives  # every block linear is in this plan
    json.dumps(doc)


def test_unquantised_block_linears_become_negative_rules(tiny):
    model = tiny("llama")
    card = model_card(model)
    plan = Plan.quantize(card, {card["units"]["block"].format(i=0): (4, 32)})
    doc, _ = export(plan, model, "gptqmodel")
    assert sum(k.startswith("-:") for k in doc["dynamic"]) == (model.n_layers - 1) * 7


def test_plans_the_tools_cannot_express_are_refused(tiny):
    model = tiny("llama")
    card = model_card(model)
    with pytest.raises(PlanError, match="quantises nothing"):
        export(Plan.drop(card, [Unit(1, "block")]), model, "torchao")
    with pytest.raises(PlanError, match="unknown export format"):
        export(Plan.quantize(card, {card["units"]["block"].format(i=0): (4, 32)}), model, "onnx")


def test_cli_export_writes_each_format(capsys, tmp_path, tiny_dir):
    import lensbench

    model_dir = tiny_dir("llama")
    model = lensbench.load(str(model_dir))
    card = model_card(model)
    plan = Plan.quantize(card, {card["units"]["block"].format(i=0): (4, 32)})
    path = plan.save(tmp_path / "mixed.plan.json")
    for fmt, out in (("torchao", "a.json"), ("llm-compressor", "r.yaml"), ("gptqmodel", "q.json")):
        code, stdout, err = run_cli(capsys, "export", str(path), "--format", fmt, "--model", str(model_dir), "--out",
                                    str(tmp_path / out))
        assert code == 0, err
        assert (tmp_path / out).is_file()
    assert (tmp_path / "a.py").is_file()
    code, _, err = run_cli(capsys, "export", str(path), "--format", "onnx", "--model", str(model_dir))
    assert code == 2 and "unknown export format" in err


@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_torchao_export_runs_in_torchao_on_cpu(tiny, scheme):
    """The exported FqnToConfig, executed as written, quantises exactly the plan's linears with torchao's
    own rounding: each weight lands within one quantisation step of lensbench's (the grids differ: torchao
    rounds an integer zero point, lensbench keeps a float minimum)."""
    import copy

    import torch

    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from lensbench.simquant import dequantised

    model = tiny("llama")
    card = model_card(model)
    plan = Plan.quantize(card, {"model.layers.0": (4, 32, scheme), "model.layers.2.mlp": (8, 32, scheme)})
    doc, _ = export(plan, model, "torchao")
    module = copy.deepcopy(model.module)
    exec(doc["python"], {"model": module})  # noqa: S102 - the export's own code, as a user runs it
    targets = plan.quant_targets(model)
    for name, m in module.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight
        if name not in targets:
            assert type(w) is torch.nn.Parameter and torch.equal(w, model.module.get_submodule(name).weight)
            continue
        assert "torchao" in type(w).__module__, name
        theirs = w.dequantize().float()
        dense = model.module.get_submodule(name).weight.detach()
        ours = dequantised(dense, targets[name])
        groups = dense.unflatten(1, (-1, 32))
        span = (groups.amax(-1) - groups.amin(-1)) if scheme == "asym" else 2 * groups.abs().amax(-1)
        step = (span / (2 ** targets[name].bits - 1)).repeat_interleave(32, 1)
        assert ((theirs - ours).abs() <= step * 1.01 + 1e-6).all(), name


def test_llm_compressor_recipe_groups_validate_as_compressed_tensors_schemes(mixed):
    """llm-compressor itself cannot be installed beside this stack (0.14 needs transformers <= 5.17); its
    QuantizationModifier's config_groups are compressed-tensors QuantizationSchemes, which validate here."""
    from compressed_tensors.quantization import QuantizationScheme

    model, plan = mixed
    doc, _ = export(plan, model, "llm-compressor")
    groups = doc["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["config_groups"]
    for group in groups.values():
        scheme = QuantizationScheme.model_validate(group)
        assert scheme.weights.num_bits in (2, 4, 8) and scheme.weights.strategy == "group"
        assert scheme.weights.symmetric is False and scheme.weights.group_size in (32, 64)
