"""The quantised KV cache: packed storage against a dequantise-everything reference, decoding through
transformers (generate, sliding windows), the KV plan action, evaluate --context, the kv_sensitivity analysis
and the kv-tuner policy."""
import json

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicCache

import lensbench as lb
from lensbench.compress.plan import KV, Plan
from lensbench.compress.policies.kv_tuner import bits_of, group_layers, pareto
from lensbench.errors import LensbenchError, PlanError
from lensbench.gpu import kvquant
from lensbench.kvcache import KVCache, KVSpec, PackedKVLayer, cache_bytes, reference_states
from lensbench.kvmeasure import continuation_scores, prefill, windows
from lensbench.load import from_module
from lensbench.testing import tiny_tokenizer
from lensbench.units import templates_of

LONG = " ".join(["The council met on Tuesday to agree the budget for the next year, and the mayor said the plan "
                 "would protect jobs and services across the city while keeping taxes flat."] * 6)


def card(model) -> dict:
    return {"name": model.name, "fingerprint": model.fingerprint(), "n_layers": model.n_layers,
            "units": templates_of(model.adapter)}


def kv_plan(model, spec: KV, key: str = r"re:.*") -> Plan:
    return Plan({key if key != r"re:.*" else "re:" + templates_of(model.adapter)["attn"].replace("{i}", r"\d+")
                 .replace(".", r"\."): spec}, card(model))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip_codes(bits):
    x = torch.randn(2, 3, 5, 16)
    p = kvquant.quantize(x, bits)
    assert p.codes.shape[-1] == 16 * bits // 8 and p.scale.dtype == torch.float16
    q = kvquant.codes(p)
    assert int(q.max()) <= (1 << bits) - 1
    # codes decode back to within half a step of the input
    err = (kvquant.dequantize(p) - x).abs()
    assert bool((err <= p.scale.float()[..., None] * 0.5 + 1e-3).all())


@pytest.mark.parametrize("spec", [KVSpec(4, 2), KVSpec(8, 4, window=5), KVSpec(2, 4, "channel", group=8, window=3),
                                  KVSpec(2, 2, "channel", group=4)])
def test_packed_layer_matches_reference(spec):
    torch.manual_seed(0)
    layer, ks, vs = PackedKVLayer(spec), [], []
    for step, n in enumerate([13, 1, 1, 7, 1, 9, 2]):
        k, v = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
        ks.append(k)
        vs.append(v)
        got_k, got_v = layer.update(k, v)
        if step == 0:  # the prompt attends in full precision
            assert torch.equal(got_k, k) and torch.equal(got_v, v)
            continue
        ref_k = reference_states(torch.cat(ks, 2), spec, keys=True)
        ref_v = reference_states(torch.cat(vs, 2), spec, keys=False)
        torch.testing.assert_close(got_k, ref_k, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_v, ref_v, rtol=1e-6, atol=1e-6)
    assert layer.get_seq_length() == 34
    # packed: far fewer bytes than the float32 states it stands for
    assert layer.nbytes < 0.7 * 2 * 34 * 2 * 16 * 4  # tiny heads: scales weigh; spare buffer room included


def test_bad_specs_are_one_line():
    for kwargs, words in [({"k_bits": 3}, "k_bits=3"), ({"v_bits": 16}, "v_bits=16"), ({"axis": "head"}, "axis"),
                          ({"window": -1}, "window"), ({"group": 0}, "group")]:
        with pytest.raises(LensbenchError, match=words) as exc:
            KVSpec(**kwargs)
        assert "\n" not in str(exc.value)


def test_no_spec_cache_is_the_dense_cache(tiny):
    m = tiny("llama")
    ids = m.tokenize([LONG], max_length=40).input_ids
    with torch.no_grad():
        dense = m.module(input_ids=ids, use_cache=True).logits
        ours = m.module(input_ids=ids[:, :30], cache=KVCache(m.module.config, {}), use_cache=True)
        rest = m.module(input_ids=ids[:, 30:], cache=ours.cache, use_cache=True).logits
    torch.testing.assert_close(rest, dense[:, 30:], rtol=1e-5, atol=1e-5)


def _tiny_sliding(window: int):
    import transformers as T

    cfg = T.Gemma2Config(vocab_size=600, max_position_embeddings=128, hidden_size=32, num_attention_heads=4,
                         num_hidden_layers=2, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                         sliding_window=window)
    torch.manual_seed(0)
    module = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return from_module(module, tokenizer=tiny_tokenizer(), card={"name": "tiny-gemma2-sliding"})


def test_sliding_window_layers_decode_like_transformers():
    """Gemma-2/3 local layers: the quantised cache keeps only what the window sees, and decodes as
    transformers' own sliding cache does (exactly with no specs, closely at KV8)."""
    m = _tiny_sliding(8)
    ids = m.tokenize([LONG], max_length=40).input_ids

    def decode(cache):
        out = m.module(input_ids=ids[:, :20], cache=cache, use_cache=True)
        rows = []
        for t in range(20, 40):
            out = m.module(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
            rows.append(out.logits[0, -1])
        return torch.stack(rows), out.cache

    with torch.no_grad():
        ref, dense_cache = decode(DynamicCache(config=m.module.config))
        same, _ = decode(KVCache(m.module.config, {}))
        q8, cache = decode(KVCache(m.module.config, {0: KVSpec(8, 8), 1: KVSpec(8, 8)}))
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-5)
    assert (q8 - ref).abs().max() < 0.05 * ref.abs().max()
    local = [layer for layer in cache.layers if layer.is_sliding]
    assert local and all(layer.held <= 7 for layer in local)
    # and hold memory for those tokens only (per token: 2 heads x (8 code bytes + 4 scale bytes) x K and V),
    # not for the 20-token prompt they were filled from
    assert all(layer.nbytes <= 48 * (7 * 5 // 4 + 16) for layer in local)


def test_kv_plan_json_and_bad_input(tiny):
    m = tiny("llama")
    plan = kv_plan(m, KV(4, 2, axis="channel", window=16))
    doc = json.loads(json.dumps(plan.to_dict()))
    again = Plan.from_dict(doc, "x")
    assert again.actions == plan.actions
    assert list(doc["actions"].values())[0] == {"op": "kv", "k_bits": 4, "v_bits": 2, "axis": "channel", "window": 16}
    assert plan.bind(m).kv == {i: KV(4, 2, axis="channel", window=16) for i in range(m.n_layers)}
    bad = dict(doc, actions={"model.layers.0.self_attn": {"op": "kv", "k_bits": 3, "v_bits": 4}})
    with pytest.raises(PlanError, match="k_bits=3 is not supported"):
        Plan.from_dict(bad, "x")
    with pytest.raises(PlanError, match="unknown KV fields"):
        Plan.from_dict(dict(doc, actions={"model.layers.0.self_attn": {"op": "kv", "k_bits": 4, "v_bit": 4}}), "x")
    with pytest.raises(PlanError, match="no block or attention by that name"):
        Plan({"model.layers.9.self_attn": KV(4, 4)}, card(m)).bind(m)


def test_kv_plan_for_an_encoder_is_refused(tiny):
    enc = tiny("bert")
    plan = Plan({"re:.*": KV(4, 4)}, {k: v for k, v in card(enc).items() if k != "fingerprint"})
    with pytest.raises(PlanError, match="encoder and has no KV cache"):
        plan.bind(enc)


def test_apply_decodes_generate_through_the_packed_cache(tiny):
    m = tiny("llama")
    plan = kv_plan(m, KV(2, 2))
    seen = []
    handle = m.adapter.blocks[0].get_submodule(m.adapter.attn).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(type(kwargs.get("cache"))), with_kwargs=True)
    ids = m.tokenize([LONG], max_length=20).input_ids
    try:
        with torch.no_grad(), lb.apply(m, plan):
            m.module.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert seen and set(seen) == {KVCache}
        seen.clear()
        with torch.no_grad():
            m.module.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert KVCache not in seen  # restored: the dense cache again
    finally:
        handle.remove()


def test_one_plan_removes_quantises_and_packs_the_cache(tiny, tmp_path):
    """Removed units, weight bits and KV bits in one plan: the cache has one layer per attention that runs,
    the packed one where the plan says, and a saved checkpoint's record says what the KV entries are."""
    m = tiny("llama")
    names = templates_of(m.adapter)
    plan = Plan({names["block"].format(i=1): {"op": "drop"}, names["block"].format(i=0): lb.Quant(4, 16),
                 names["attn"].format(i=2): KV(2, 2)}, card(m))
    ids = m.tokenize([LONG], max_length=24).input_ids
    with torch.no_grad(), lb.apply(m, plan):
        out = m.module(input_ids=ids[:, :16], use_cache=True)
        out = m.module(input_ids=ids[:, 16:], cache=out.cache, use_cache=True)
        cache = out.cache
    assert isinstance(cache, KVCache) and len(cache.layers) == 2
    assert isinstance(cache.layers[1], PackedKVLayer) and not isinstance(cache.layers[0], PackedKVLayer)
    saved = lb.compress(m, plan, format="hf", out=tmp_path / "saved")
    assert saved.record["kv_cache"]["layers"] == {"2": "KV2"}


@pytest.mark.real
def test_kv8_is_close_to_dense_and_kv4_is_small(smollm, bbc_texts):
    (ids,) = windows(smollm, bbc_texts, 320, 1)
    pre = prefill(smollm, ids, 256)
    every = range(smollm.n_layers)
    kv8 = continuation_scores(smollm, pre, {i: KVSpec(8, 8) for i in every})
    kv2 = continuation_scores(smollm, pre, {i: KVSpec(2, 2) for i in every})
    assert kv8["kl"] / kv8["n"] < 2e-3 < kv2["kl"] / kv2["n"]
    cache = KVCache(smollm.module.config, {i: KVSpec(4, 4) for i in every})
    dense = DynamicCache(config=smollm.module.config)
    with torch.no_grad():
        smollm.module(input_ids=ids, cache=cache, use_cache=True)
        smollm.module(input_ids=ids, cache=dense, use_cache=True)
    assert cache_bytes(cache) <= 0.3 * cache_bytes(dense)


def test_evaluate_context_records_cache_bytes(tiny, texts):
    m = tiny("llama")
    plan = kv_plan(m, KV(4, 4))
    cfg = lb.EvalConfig(texts=2, cities=0, topics=0, speed_rounds=1, decode_tokens=4, context=24)
    r = lb.evaluate(m, plan, cfg, texts=[LONG, LONG])
    assert r["context"] == 24 and r["data"]["windows"] == 2 and r["data"]["n_tokens_scored"] == 2 * 4
    assert 0 < r["kv_cache_bytes"] < 0.5 * r["dense_kv_cache_bytes"]
    assert r["kl_to_dense"] > 0
    with pytest.raises(LensbenchError, match="window of 40 tokens"):
        lb.evaluate(m, kv_plan(m, KV(4, 4, window=40)), cfg, texts=[LONG, LONG])
    with pytest.raises(LensbenchError, match="exceeds"):
        lb.evaluate(m, plan, lb.EvalConfig(texts=1, cities=0, topics=0, context=4000), texts=[LONG])


def test_kv_sensitivity_and_kv_tuner(tiny, texts):
    m = tiny("llama")
    profile = lb.profile(m, [LONG] * 2, analyses=["kv_sensitivity"], seq_len=48, progress=False)
    kl = profile["kv_kl"]
    assert kl.values.shape == (m.n_layers, 8) and kl.params["pair_names"][0] == "KV8"
    names = kl.params["pair_names"]
    assert bool((kl.values[:, names.index("KV8")] <= kl.values[:, names.index("KV2")]).all())
    assert profile["kv_attn_error"].values.shape == (m.n_layers, 8)
    assert {r["key_heavy"] for r in profile.tables["kv_keys_vs_values"].rows} == {"K8V4", "K4V2"}
    plan = lb.plan(profile, "kv-tuner", 5.0, model=m, texts=[LONG] * 3, trials=12, population=4, windows=2,
                   prompt_tokens=24, groups=2)
    bound = plan.bind(m)
    assert set(bound.kv) == set(range(m.n_layers))
    bits = np.mean([kv.bits for kv in bound.kv.values()])
    assert bits <= 5.0 + 1e-9 and plan.predicted["kv_bits"] == pytest.approx(bits)
    meta = plan.meta["kv_tuner"]
    assert sorted(i for g in meta["groups"] for i in g) == list(range(m.n_layers))
    assert meta["pareto_front"] and all(p["kv_bits"] <= 8 for p in meta["pareto_front"])
    # the chosen plan is no worse on calibration KL than the best uniform pair within the budget
    uniform = [u["calibration_kl"] for u in meta["uniform"].values() if u["kv_bits"] <= 5.0]
    assert plan.predicted["calibration_kl"] <= min(uniform) + 1e-12
    with pytest.raises(PlanError, match="outside what the pairs allow"):
        lb.plan(profile, "kv-tuner", 9, model=m, texts=[LONG])
    with pytest.raises(PlanError, match="were not measured"):
        lb.plan(profile, "kv-tuner", 4, model=m, texts=[LONG], pairs="KV8,K8V8V")


def test_pareto_pruning_and_grouping():
    names = ["KV8", "K8V4", "K4V8", "KV4", "KV2"]
    assert pareto(np.array([0.0, 0.01, 0.05, 0.1, 2.0]), names) == ["KV8", "K8V4", "KV4", "KV2"]
    assert pareto(np.array([0.0, 0.05, 0.01, 0.1, 2.0]), names) == ["KV8", "K4V8", "KV4", "KV2"]
    assert pareto(np.array([0.0, 0.01, 0.05, 0.2, 0.1]), names) == ["KV8", "K8V4", "KV2"]  # KV4 beaten by KV2
    assert bits_of("K4V2") == (4, 2) and bits_of("KV8") == (8, 8)
    kl = np.array([[1e-4, 1e-3], [1.1e-4, 1.2e-3], [1e-1, 1.0], [1.2e-1, 0.9]])
    assert group_layers(kl, 2, seed=0) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_attention_on_packed_states_matches_dequantised(bits):
    from lensbench.gpu import kvattention
    from lensbench.kvcache import pack_states, unpack_states

    torch.manual_seed(bits)
    q = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    for per_channel, T in ((0, 37), (8, 40)):
        p = pack_states(torch.randn(1, 2, T, 16), bits, per_channel)
        k = unpack_states(p, torch.float64, per_channel)
        torch.testing.assert_close(kvattention.scores(q, p, per_channel), q @ k.transpose(-1, -2))
    p = pack_states(torch.randn(1, 2, 37, 16), bits)
    w = torch.softmax(torch.randn(1, 2, 3, 37, dtype=torch.float64), -1)
    torch.testing.assert_close(kvattention.weighted(w, p), w @ unpack_states(p, torch.float64))


@pytest.mark.parametrize("spec", [KVSpec(4, 2), KVSpec(2, 4, "channel", group=4, window=3), KVSpec(8, 8, window=5)])
def test_fused_decode_matches_dequantising_decode(spec):
    """Decode steps that read the packed codes (packed_sdpa) give the logits that dequantising gives (float64,
    so no key lands on the other side of a rounding boundary by summation order alone)."""
    from lensbench.kvcache import use_packed_attention
    from lensbench.testing import tiny_model

    m = tiny_model("llama", dtype=torch.float64, attn="sdpa")
    ids = m.tokenize([LONG], max_length=40).input_ids
    specs = {i: spec for i in range(m.n_layers)}

    def decode():
        cache = KVCache(m.module.config, specs)
        out = m.module(input_ids=ids[:, :20], cache=cache, use_cache=True)
        rows = []
        for t in range(20, 40):
            out = m.module(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
            rows.append(out.logits[0, -1])
        return torch.stack(rows), cache

    with torch.no_grad():
        plain, cache = decode()
        assert not cache.layers[0].fused
        undo = use_packed_attention(m.module)
        try:
            fused, cache = decode()
        finally:
            undo()
    assert cache.layers[0].fused and m.module.config._attn_implementation == "sdpa"
    torch.testing.assert_close(fused, plain, rtol=1e-9, atol=1e-9)
