"""BAQ: bit-widths across each linear's input groups from GPTQ column losses (reverse water-filling), run as one
packed part per width; the policy, its plans on disk, evaluate/apply and what the exporters refuse."""
import itertools
import json

import numpy as np
import pytest
import torch

from lensbench.compress.apply import apply
from lensbench.compress.baq import BAQConfig, allocate, baq_weight, closed_form
from lensbench.compress.database import DatabaseConfig, build, prepare as db_prepare
from lensbench.compress.export import export
from lensbench.compress.gptq import GPTQConfig, gptq_weight, layer_error
from lensbench.compress.plan import Plan, Quant
from lensbench.compress.policies import make_plan
from lensbench.errors import PlanError
from lensbench.gpu.mixed import MixedWeight, quantize_mixed
from lensbench.gpu.modules import MixedQuantLinear
from lensbench.gpu.quant import QuantError, quantize
from lensbench.gpu.reference import dequantize
from lensbench.profiling import model_card, profile_model
from lensbench.simquant import simulated
from lensbench.testing import SAMPLE_TEXTS

TEXTS = list(SAMPLE_TEXTS)


def _layer(n=48, k=100, seed=0):
    """A weight and a Hessian whose input columns differ widely in scale (as real activations do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, k, generator=g) * torch.exp(torch.randn(k, generator=g))
    return torch.randn(n, k, generator=g) * 0.05, 2 * x.T @ x / 2000


def test_allocation_matches_the_hand_solution_and_brute_force():
    # c = loss * 4^3; from all at 2: group 2 gains most per bit twice (2->3, 3->4), then two others 2->3
    assert allocate([1, 1, 100, 1], [1, 1, 1, 1], 3, 3.0, (2, 3, 4, 8)) == [3, 3, 4, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):  # equal group sizes, levels one bit apart: the greedy is the exact optimum
        loss = np.exp(rng.normal(0, 2, 5))
        budget = int(rng.integers(10, 20)) / 5
        got = allocate(loss, [1] * 5, 3, budget, (2, 3, 4))
        fits = [b for b in itertools.product((2, 3, 4), repeat=5) if sum(b) <= budget * 5 + 1e-9]
        assert sum(got) <= budget * 5 + 1e-9
        assert _modelled(loss, got) == pytest.approx(min(_modelled(loss, b) for b in fits))


def _modelled(loss, bits) -> float:
    return sum(c * 4.0 ** (3 - b) for c, b in zip(loss, bits, strict=True))


def test_the_closed_form_gives_every_group_the_same_loss():
    loss = np.array([0.5, 2.0, 30.0, 1.0])
    b = closed_form(loss, 3, 3.25)
    assert b.mean() == pytest.approx(3.25)
    per = loss * 4.0 ** 3 * 4.0 ** -b
    assert np.allclose(per, per[0])


def test_column_losses_add_up_to_the_layer_error():
    w, h = _layer()
    for act_order in (False, True):
        r = gptq_weight(w, h, 3, 16, cfg=GPTQConfig(damp=1e-9, act_order=act_order))
        assert r.column_loss.shape == (w.shape[1],)
        assert float(r.column_loss.sum()) == pytest.approx(r.error, rel=1e-5)  # tr(ΔW H ΔWᵀ) = Σ_j e_j²


def test_gptq_with_one_width_per_group():
    w, h = _layer()
    same = gptq_weight(w, h, [4] * 7, 16)  # 100 inputs in groups of 16: 7 groups, the last of 4
    uniform = gptq_weight(w, h, 4, 16)
    assert torch.equal(dequantize(same.packed), dequantize(uniform.packed))
    mixed = gptq_weight(w, h, [2, 4, 8, 3, 4, 2, 8], 16, symmetric=True)
    assert isinstance(mixed.packed, MixedWeight) and mixed.packed.group_bits == (2, 4, 8, 3, 4, 2, 8)
    assert [pw.bits for _, pw in mixed.packed.parts] == [2, 3, 4, 8]
    assert mixed.error <= mixed.rtn_error  # against round-to-nearest on the same widths
    assert mixed.error == pytest.approx(layer_error(w, dequantize(mixed.packed), h))
    with pytest.raises(QuantError, match="7 groups"):
        gptq_weight(w, h, [4, 4], 16)


def test_mixed_rtn_is_each_width_s_grid_on_its_groups():
    w, _ = _layer()
    widths = [2, 4, 8, 3, 4, 2, 8]
    mw = quantize_mixed(w, widths, 16)
    dense = dequantize(mw)
    for g, b in enumerate(widths):
        cols = slice(16 * g, min(16 * (g + 1), 100))
        assert torch.equal(dense[:, cols], dequantize(quantize(w[:, cols], b, 16)))
    assert mw.bits == pytest.approx(sum(b * min(16, 100 - 16 * g) for g, b in enumerate(widths)) / 100)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_mixed_linear_runs_the_parts_on_the_kernels(rows):
    w, h = _layer()
    mw = gptq_weight(w, h, [2, 4, 8, 3, 4, 2, 8], 16).packed
    bias = torch.randn(48)
    layer = MixedQuantLinear(mw, bias, torch.float32)
    x = torch.randn(rows, 100)
    want = x @ dequantize(mw).T + bias
    assert torch.allclose(layer(x), want, atol=2e-2 * want.abs().max())  # decode paths run bf16 activations
    assert torch.equal(layer.weight, dequantize(mw))


def test_baq_beats_uniform_gptq_at_the_same_budget():
    w, h = _layer(n=64, k=256)
    for budget in (2.5, 3.0, 3.5):
        r = baq_weight(w, h, budget, 16, cfg=GPTQConfig(), baq=BAQConfig((2, 3, 4, 8)))
        assert r.rate <= budget + 1e-9 and len(r.group_bits) == 16
        uniform = gptq_weight(w, h, int(budget), 16)  # the widest uniform grid within the budget
        assert r.result.error < uniform.error


def test_plan_entries_round_trip_and_bad_widths_are_one_line(tiny, tmp_path):
    model = tiny("llama")
    q = Quant(8, 16, "asym", "gptq", (2, 4, 8, 4))
    assert Quant.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    with pytest.raises(QuantError, match="widest"):
        Quant(4, 16, "asym", "gptq", (2, 8))
    with pytest.raises(QuantError, match="asym or sym"):
        Quant(4, 0, "gguf", "rtn", (4, 4))
    k = model.module.model.layers[0].self_attn.q_proj.in_features
    wrong = Quant(4, 16, "asym", "rtn", (4,) * (-(-k // 16) + 1))  # one group too many
    bad = Plan.quantize(model_card(model), {"model.layers.0.self_attn.q_proj": wrong})
    with pytest.raises(PlanError, match=f"{k} inputs in groups of 16"):
        bad.bind(model)
    emb = Plan.quantize(model_card(model), {"model.embed_tokens": Quant(4, 16, "asym", "rtn", (4,) * (k // 16))})
    with pytest.raises(PlanError, match="embedding"):
        emb.bind(model)


def _baq_plan(model, **kw):
    prof = profile_model(model, TEXTS, analyses=["weight_outliers"], progress=False, seq_len=32)
    return make_plan("bits-baq", prof, 3.0, model=model, texts=TEXTS, group_size=16, method="gptq",
                     levels="2,4,8", **kw)


def test_the_policy_plans_rtn_simulation_apply_and_saving_agree(tiny, tmp_path):
    model = tiny("llama")
    plan = _baq_plan(model)
    quant = plan.quant_actions()
    assert plan.predicted["average_bits"] <= 3.0 + 1e-9 and plan.predicted["mixed_linears"] >= 1
    assert any(q.group_bits for q in quant.values())
    assert plan.predicted["layer_error_vs_rtn"] < 1
    plan = Plan.from_dict(json.loads(json.dumps(plan.to_dict())), "plan")  # on disk and back
    rtn = plan.with_method("rtn")
    ids = model.tokenize(TEXTS[:2]).model_inputs()
    with torch.no_grad():
        with apply(model, rtn):
            mixed = [m for m in model.module.modules() if isinstance(m, MixedQuantLinear)]
            assert mixed
            got = model.module(**ids).logits
        with simulated(model, rtn.bind(model).quant):
            want = model.module(**ids).logits
    assert torch.allclose(got, want, atol=5e-2)  # the decode kernels' bf16 activations


def test_with_a_database_evaluate_applies_gptq_at_the_allocated_widths(tiny, tmp_path):
    model = tiny("llama")
    db = build(model, TEXTS, tmp_path / "db", DatabaseConfig(levels=(2, 4, 8), group_size=16, kl_texts=0,
                                                             gptq=GPTQConfig(batch_size=4, seq_len=64)))
    plan = _baq_plan(model, database=str(db.folder))
    bound = plan.bind(model)
    db_prepare(model, bound, [])
    name = next(n for n, q in bound.quant.items() if q.group_bits)
    module = model.module.get_submodule(name)
    want = gptq_weight(module.weight, db.hessian(name), list(bound.quant[name].group_bits), 16,
                       cfg=GPTQConfig(batch_size=4, seq_len=64))
    ids = model.tokenize(TEXTS[:2]).model_inputs()
    with torch.no_grad():
        with apply(model, bound):
            assert torch.equal(model.module.get_submodule(name).weight, dequantize(want.packed))
            got = model.module(**ids).logits
        with simulated(model, bound.quant, db.weights(model)):  # what the study measures
            assert torch.allclose(got, model.module(**ids).logits, atol=5e-2)


def test_exports_and_compressed_tensors_refuse_per_group_widths(tiny, tmp_path):
    from lensbench.compress.save import compress

    model = tiny("llama")
    plan = _baq_plan(model, scheme="sym").with_method("rtn")
    with pytest.raises(PlanError, match="per-group bit-widths"):
        export(plan, model, "torchao")
    with pytest.raises(PlanError, match="per-group bit-widths"):
        compress(model, plan, format="compressed-tensors", out=tmp_path / "ct")

