"""Plans applied for real: removed units are not computed, generation with a KV cache matches a model
built without those units, and the dense model comes back."""
import copy

import pytest
import torch

from lensbench.compress.apply import apply
from lensbench.surgery import weight_bytes
from lensbench.errors import PlanError
from lensbench.compress.plan import Plan
from lensbench.units import Unit, templates_of
from lensbench.profiling import model_card
from lensbench.testing import TINY_ARCHS

CAUSAL = [a for a in TINY_ARCHS if a != "bert"]


def reference(model, units):
    """The same network built the slow, obvious way: removed sublayers have all-zero weights (so they add
    exactly nothing), removed blocks are absent from a model constructed with fewer layers."""
    ad = model.adapter
    module = copy.deepcopy(model.module)
    with torch.no_grad():
        for u in units:
            if u.kind != "block":
                for p in module.get_submodule(ad.unit_path(u.layer, u.kind)).parameters():
                    p.zero_()
    dropped = sorted(u.layer for u in units if u.kind == "block")
    if not dropped:
        return module
    kept = [i for i in range(ad.n_layers) if i not in dropped]
    config = copy.deepcopy(module.config)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(kept))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    small = type(module)(config).eval()
    state = {}
    prefix = ad.block_path(0)[:-1]
    for name, t in module.state_dict().items():
        if name.startswith(prefix):
            i, rest = name[len(prefix):].split(".", 1)
            if int(i) in dropped:
                continue
            name = f"{prefix}{kept.index(int(i))}.{rest}"
        state[name] = t
    small.load_state_dict(state)
    return small


def plan_for(model, units):
    return Plan.drop(model_card(model), units, policy={"name": "test"})


def greedy(module, ids, n, use_cache):
    with torch.no_grad():
        return module.generate(ids, max_new_tokens=n, do_sample=False, use_cache=use_cache,
                               attention_mask=torch.ones_like(ids), pad_token_id=0)


MIXED = [Unit(0, "attn"), Unit(1, "block"), Unit(2, "mlp")]


@pytest.mark.parametrize("arch", CAUSAL)
def test_applied_plan_matches_a_model_built_without_the_units(arch, tiny, texts):
    model = tiny(arch)
    units = [Unit(1, "block"), Unit(0, "attn"), Unit(2, "mlp")]
    ref = reference(model, units)
    batch = model.tokenize(texts[:3])
    with torch.no_grad():
        dense = model.module(**batch.model_inputs()).logits
        with apply(model, plan_for(model, units)):
            ours = model.module(**batch.model_inputs()).logits
        expected = ref(**batch.model_inputs()).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - dense).abs().max() > 1e-3  # the plan changed something
    with torch.no_grad():  # the dense model is back
        torch.testing.assert_close(model.module(**batch.model_inputs()).logits, dense, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("units", [[Unit(0, "attn")], [Unit(0, "block")], MIXED], ids=["attn0", "block0", "mixed"])
def test_generation_with_kv_cache_is_correct_for_the_layers_kept(arch, units, tiny, texts):
    model = tiny(arch)
    ids = model.tokenize(texts[:1]).input_ids
    ref = reference(model, units)
    with apply(model, plan_for(model, units)):
        cached = greedy(model.module, ids, 12, use_cache=True)
        uncached = greedy(model.module, ids, 12, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy(ref, ids, 12, use_cache=True))


def test_removed_units_are_not_computed_and_hold_no_weights(tiny, texts):
    model = tiny("llama")
    calls = []
    handles = [model.adapter.blocks[i].get_submodule(m).register_forward_hook(lambda *a, i=i, m=m: calls.append((i, m)))
               for i in range(3) for m in ("self_attn", "mlp", "input_layernorm")]
    dense_bytes = weight_bytes(model.module)
    with apply(model, plan_for(model, MIXED)):
        model.module(**model.tokenize(texts[:1]).model_inputs())
        applied_bytes = weight_bytes(model.module)
    for h in handles:
        h.remove()
    assert sorted(calls) == [(0, "mlp"), (2, "input_layernorm"), (2, "self_attn")]
    blk = model.adapter.blocks[0]
    per_block = sum(p.numel() * 4 for p in blk.parameters())
    attn = sum(p.numel() * 4 for p in blk.self_attn.parameters()) + blk.input_layernorm.weight.numel() * 4
    mlp = sum(p.numel() * 4 for p in blk.mlp.parameters()) + blk.post_attention_layernorm.weight.numel() * 4
    assert dense_bytes - applied_bytes == per_block + attn + mlp


def test_dense_model_restored_after_an_exception(tiny, texts):
    model = tiny("llama")
    before = [id(b) for b in model.adapter.blocks]
    with pytest.raises(RuntimeError):
        with apply(model, plan_for(model, MIXED)):
            raise RuntimeError("boom")
    assert [id(b) for b in model.adapter.blocks] == before
    assert model.module.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in model.adapter.blocks] == [0, 1, 2]
    assert type(model.adapter.blocks[0].self_attn).__name__ == "LlamaAttention"


def test_plan_round_trips_and_is_fqn_shaped(tmp_path, tiny):
    model = tiny("llama")
    plan = plan_for(model, MIXED)
    assert plan.to_fqn_config() == {"model.layers.0.self_attn": {"op": "drop"}, "model.layers.1": {"op": "drop"},
                                    "model.layers.2.mlp": {"op": "drop"}}
    back = Plan.load(plan.save(tmp_path / "plan.json"))
    assert back.units() == plan.units() == sorted(MIXED)
    assert back.resolve(model) == sorted(MIXED)
    assert "drops 1 blocks, 1 attention, 1 MLP of 3 layers" in repr(back)


def test_regex_patterns_and_normalisation(tiny):
    model = tiny("llama")
    plan = Plan({r"re:model\.layers\.[01]\.mlp": {"op": "drop"}, "model.layers.1.self_attn": {"op": "drop"}},
                model_card(model) | {"units": templates_of(model.adapter)})
    assert plan.resolve(model) == [Unit(0, "mlp"), Unit(1, "block")]


@pytest.mark.parametrize("actions, message", [
    ({"model.layers.7.self_attn": {"op": "drop"}}, "which tiny-llama does not have"),
    ({"model.layers.0": {"op": "prune"}}, "supported:"),
    ({"re:model\\.layers\\.\\d+": {"op": "drop"}}, "removes all 3 layers"),
    ({"re:model\\.layers\\.\\d+\\.(self_attn|mlp)": {"op": "drop"}}, "removes all 3 layers"),
    ({"re:(": {"op": "drop"}}, "not a valid regular expression"),
])
def test_bad_plans_fail_before_any_work(tiny, actions, message):
    model = tiny("llama")
    with pytest.raises(PlanError, match=message.replace("(", r"\(")):  # an unknown op: when the plan is built
        with apply(model, Plan(actions, model_card(model))):
            raise AssertionError("must not get here")


def test_plan_for_another_model_is_refused(tiny):
    plan = plan_for(tiny("llama"), [Unit(0, "block")])
    with pytest.raises(PlanError, match="made for 'tiny-llama'.*not for 'tiny-qwen2'"):
        plan.resolve(tiny("qwen2"))


def test_post_norm_encoders_drop_blocks_only(tiny, texts):
    model = tiny("bert")
    with pytest.raises(PlanError, match="post-norm"):
        plan_for(model, [Unit(0, "attn")]).resolve(model)
    batch = model.tokenize(texts[:2])
    ref = reference(model, [Unit(1, "block")])
    with torch.no_grad(), apply(model, plan_for(model, [Unit(1, "block")])):
        ours = model.module(**batch.model_inputs()).last_hidden_state
    torch.testing.assert_close(ours, ref(**batch.model_inputs()).last_hidden_state)


def test_corrupt_plan_files(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{\"schema\": \"lensbench.plan/1\", \"actions\": ")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(bad)
    bad.write_text("{\"schema\": \"other\"}")
    with pytest.raises(PlanError, match="not a lensbench plan"):
        Plan.load(bad)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "phi", "gpt_neox_sequential"])
def test_prefix_reusing_ablation_scan_equals_the_naive_scan(arch, tiny64, texts):
    from lensbench.analyses.ablation import naive_scan, units_for
    from lensbench.replay import DenseRun, removed_states, token_scores

    model = tiny64(arch)  # float64 on both sides: a KL of ~1e-4 computed in float32 is good to ~1e-3 relative
    batch = model.tokenize(texts[:4])
    units = units_for(model, ("block", "attn", "mlp"))
    dense = DenseRun.from_batch(model, batch)
    ours = [float(token_scores(model, dense, removed_states(model, dense, [u]))[0].mean()) for u in units]
    ref = naive_scan(model, batch, units)
    assert ref.min() > 0
    assert ours == pytest.approx(list(ref), rel=1e-6, abs=1e-12)


def test_ablation_analyzer_in_a_profile(tiny, texts):
    from lensbench.profiling import profile_model

    model = tiny("llama")
    prof = profile_model(model, texts, analyses=["ablation"], progress=False)
    for kind in ("block", "attn", "mlp"):
        kl = prof[f"ablation_kl_{kind}"]
        assert kl.higher_is_more_important and kl.values.shape == (3,) and (kl.values > 0).all()
    # removing a whole block costs more than removing either of its sublayers, on every layer of this model
    assert (prof["ablation_kl_block"].values >= prof["ablation_kl_mlp"].values - 1e-6).all()
