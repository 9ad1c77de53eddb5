import pytest
import torch

from lensbench import LensbenchError, capture
from lensbench.analyses.channels import head_circuits
from lensbench.analyses.interventions import edit_component, intervention_effect
from lensbench.testing import TINY_ARCHS


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_head_out_weight_is_the_adapters_W_O(tiny, arch):
    m = tiny(arch)
    for layer in range(m.n_layers):
        w_o = m.adapter.head_weights(layer).W_O
        for head in range(m.adapter.n_heads):
            torch.testing.assert_close(m.adapter.head_out_weight(layer, head), w_o[head])


def test_projection_removes_exactly_that_direction_and_restores(tiny, texts):
    m = tiny("llama")
    v = head_circuits(m).ov().Vt[1, 2, 0]
    before = {k: t.clone() for k, t in m.module.state_dict().items()}
    with edit_component(m, 1, 2, v, scale=0.0):
        w = m.adapter.head_out_weight(1, 2)
        assert float((w @ v).abs().max()) < 1e-6  # nothing this head writes lies along v
        changed = [k for k, t in m.module.state_dict().items() if not torch.equal(t, before[k])]
        assert changed == ["model.layers.1.self_attn.o_proj.weight"]
    after = m.module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with edit_component(m, 1, 2, v, scale=1.0):  # scale 1 is the identity
        a = capture(m, texts[:2], sites=["hook_resid_post"], layers=[2])
    b = capture(m, texts[:2], sites=["hook_resid_post"], layers=[2])
    torch.testing.assert_close(a["blocks.2.hook_resid_post"], b["blocks.2.hook_resid_post"])


def test_restored_after_an_exception(tiny):
    m = tiny("gpt2")
    before = m.adapter.head_out_weight(0, 1).clone()
    with pytest.raises(RuntimeError):
        with edit_component(m, 0, 1, torch.ones(m.d_model), scale=0.0):
            raise RuntimeError("boom")
    torch.testing.assert_close(m.adapter.head_out_weight(0, 1), before, rtol=0, atol=0)


def test_effect_report_and_bad_input(tiny, texts):
    m = tiny("qwen2")
    r = intervention_effect(m, texts, writer=(0, 1), component=0, reader=(2, 3), n_random=3)
    assert r["kl_nats"] >= 0 and r["reader_attention_tv"] >= 0 and len(r["random_components"]) == 3
    assert "target_logprob_change" in r and "random_target_logprob_change_mean" in r
    same = intervention_effect(m, texts, writer=(0, 1), component=0, reader=(2, 3), scale=1.0, n_random=1)
    assert same["kl_nats"] == pytest.approx(0, abs=1e-9) and same["target_logprob_change"] == pytest.approx(0)
    assert 0 not in r["random_components"]
    with pytest.raises(LensbenchError, match="must come after"):
        intervention_effect(m, texts, writer=(2, 0), component=0, reader=(1, 0))
    with pytest.raises(LensbenchError, match="not a causal LM"):
        intervention_effect(tiny("bert"), texts, writer=(0, 0), component=0, reader=(1, 0))
