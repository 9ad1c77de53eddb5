"""`lb.load(folder, packed=True)`: a compressed-tensors checkpoint read straight into packed modules, computing
what the plan computed, with no float copy of a quantised weight; what it cannot read is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import lensbench as lb
from lensbench.gpu import cpu_kernels
from lensbench.gpu.modules import QuantLinear
from lensbench.compress import compress
from lensbench.compress.apply import apply
from lensbench.compress.plan import Plan, Quant
from lensbench.errors import LensbenchError
from lensbench.profiling import model_card
from lensbench.units import Unit
from test_compress import ids_for, planned_logits


def _saved(tiny, tmp_path, head: bool = False, arch: str = "llama"):
    model = tiny(arch)
    plan = Plan.drop(model_card(model), [Unit(1, "block")])
    plan.actions["model.layers.0"] = Quant(4, group_size=16, scheme="sym")
    plan.actions["model.layers.2.mlp"] = Quant(8, group_size=32, scheme="sym")
    plan.actions["model.layers.2.self_attn"] = Quant(3, group_size=16, scheme="sym")
    if head:
        plan.actions["lm_head"] = Quant(4, group_size=32, scheme="sym")
    compress(model, plan, format="compressed-tensors", out=tmp_path / "ck")
    return model, plan, tmp_path / "ck"


@pytest.mark.parametrize("arch,head", [("llama", False), ("llama", True), ("gemma", False)])  # gemma: tied head
def test_packed_load_computes_the_plan_without_float_weights(tiny, tmp_path, arch, head):
    model, plan, ck = _saved(tiny, tmp_path, head, arch)
    packed = lb.load(ck, packed=True)
    root = packed.module
    quant = {n: m for n, m in root.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 7 + 3 + 4 + head  # layer 0's linears, layer 2's MLP and attention (renumbered to 1)
    assert {quant["model.layers.0.mlp.up_proj"].bits, quant["model.layers.1.self_attn.q_proj"].bits} == {4, 3}
    assert not [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")]
    assert not any(p.is_meta for p in root.parameters()) and not any(b.is_meta for b in root.buffers())
    tied = model.module.lm_head.weight is model.module.model.embed_tokens.weight
    assert tied == (arch == "gemma")
    assert (root.get_output_embeddings() is quant.get("lm_head")) if head else \
        (root.lm_head.weight is root.model.embed_tokens.weight) == tied
    ids = ids_for(model)
    with torch.no_grad(), cpu_kernels.exact_kernels():
        got = packed.module(ids).logits.float().numpy()
    assert np.abs(got - planned_logits(model, plan, ids)).max() <= 1e-4
    assert packed.module.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_a_model_loaded_packed_decodes_with_the_runtime_apply_gives(tiny, tmp_path):
    """The thread policy and fused calls (`gpu.runtime`) come with packed loading too: decode steps fuse the
    linears that read one input and give the tokens the plan gives in memory."""
    model, plan, ck = _saved(tiny, tmp_path)
    root = lb.load(ck, packed=True).module
    assert "lensbench_threads" in root.__dict__
    quant = [m for m in root.modules() if isinstance(m, QuantLinear)]
    fuser = quant[0].__dict__["fuser"]
    assert all(m.__dict__["fuser"] is fuser for m in quant)
    ids = ids_for(model)[:1]
    with torch.no_grad(), cpu_kernels.exact_kernels():
        got = root.generate(ids, max_new_tokens=4, do_sample=False)
        with apply(model, plan):
            want = model.module.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert len(set(map(id, fuser.groups.values()))) >= 2  # q/k/v and gate/up of layer 0 at least


def test_packed_load_refuses_what_it_cannot_read(tiny, tmp_path):
    _, _, ck = _saved(tiny, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LensbenchError, match="symmetric=False.*load it without packed=True"):
        lb.load(ck, packed=True)
    with pytest.raises(LensbenchError, match="compressed-tensors folder .*, not .*nowhere"):
        lb.load(tmp_path / "nowhere", packed=True)
    tiny("llama").module.save_pretrained(tmp_path / "dense")
    with pytest.raises(LensbenchError, match="not a compressed-tensors pack-quantized checkpoint"):
        lb.load(tmp_path / "dense", packed=True)


def test_cli_evaluates_and_generates_a_folder_loaded_packed(tiny_dir, tmp_path, capsys):
    from lensbench.cli import main

    src = tiny_dir("llama")
    plan = Plan.quantize(model_card(lb.load(src)), {"model.layers.0": Quant(4, group_size=16, scheme="sym")})
    plan.save(tmp_path / "plan.json")
    ck = str(tmp_path / "ck")
    assert main(["compress", str(src), "--plan", str(tmp_path / "plan.json"), "--format", "compressed-tensors",
                 "--out", ck]) == 0
    args = ["evaluate", ck, "--dense", str(src), "--out", str(tmp_path / "e.json"), "--n-texts", "2", "--cities", "4",
            "--speed-rounds", "1", "--decode-tokens", "2"]
    assert main(args + ["--packed"]) == 0
    r = json.loads((tmp_path / "e.json").read_text())  # the packed kernels compute the plan's values
    assert r["kl_to_dense"] > 0 and r["kl_to_dense"] == pytest.approx(r["in_memory_plan"]["kl_to_dense"], rel=1e-3)
    capsys.readouterr()
    assert main(["generate", ck, "--packed", "--eager", "--prompt", "The report said", "--new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["evaluate", ck, "--plan", str(tmp_path / "plan.json"), "--packed", "--out",
                 str(tmp_path / "f.json")]) == 2
    assert "--packed loads a saved compressed-tensors folder" in capsys.readouterr().err
    assert main(["generate", str(src), "--packed", "--plan", str(tmp_path / "plan.json"), "--prompt", "x"]) == 2
    assert "drop one" in capsys.readouterr().err
