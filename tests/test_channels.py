"""Composition scores against TransformerLens 4 and against dense d_model x d_model products."""
import numpy as np
import pytest
import torch

import lensbench
from lensbench import LensbenchError
from lensbench.analyses.channels import Factored, all_compositions, composition, head_circuits


def _randomise_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.adapter.blocks:
            ln = blk.get_submodule(model.adapter.ln1)
            ln.weight.copy_(1 + 0.5 * torch.randn(ln.weight.shape, generator=g))
    model.card.pop("fingerprint", None)


@pytest.fixture
def tl_pair(tmp_path):
    from lensbench.testing import tiny_model

    def make(arch):
        m = tiny_model(arch, seed=3)
        _randomise_norms(m)
        m.module.save_pretrained(tmp_path / arch)
        m.tokenizer.save_pretrained(tmp_path / arch)
        return m, tmp_path / arch

    return make


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_composition_scores_equal_transformerlens(tl_pair, arch):
    from transformer_lens.model_bridge import TransformerBridge

    model, path = tl_pair(arch)
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    bridge.enable_compatibility_mode()
    ours = all_compositions(model)
    L = model.n_layers
    later = np.triu(np.ones((L, L), dtype=bool), 1)[:, None, :, None]
    for mode in ("Q", "K", "V"):
        with torch.no_grad():
            theirs = bridge.all_composition_scores(mode).scores.double().numpy()
        np.testing.assert_allclose(np.where(later, ours[mode].scores, 0), np.where(later, theirs, 0), atol=1e-5)


def test_factored_svd_matches_dense():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 40, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, 40, generator=g,
                                                                                  dtype=torch.float64)
    f = Factored.from_factors(A, B)
    torch.testing.assert_close(f.dense(), A @ B)
    torch.testing.assert_close(f.S, torch.linalg.svdvals(A @ B)[:, :8])
    torch.testing.assert_close(f.transpose().dense(), (A @ B).transpose(-1, -2))


def test_components_are_literal_rank_one_scores(tiny):
    """CS_i equals the composition score of the dense rank-1 term sigma_i u_i v_i^T with the reader."""
    m = tiny("qwen2")  # GQA
    circ = head_circuits(m)
    comp = composition(circ, "Q")
    ov = circ.ov()
    qk = circ.qk()

    def cs(left, right):
        return float((left @ right).norm() / (left.norm() * right.norm()))

    lw, hw, lr, hr = 0, 1, 2, 3
    R = qk.dense()[lr, hr].double()
    for i in range(3):
        rank1 = ov.S[lw, hw, i].double() * torch.outer(ov.U[lw, hw, :, i], ov.Vt[lw, hw, i]).double()
        assert comp.components[lw, hw, i, lr, hr] == pytest.approx(cs(rank1, R), rel=1e-4)
    assert comp.scores[lw, hw, lr, hr] == pytest.approx(cs(ov.dense()[lw, hw].double(), R), rel=1e-4)
    assert comp.scores[2, 0, 1, 0] == 0 and comp.scores[1, 0, 1, 2] == 0  # only later readers


def test_null_and_channels(tiny):
    m = tiny("llama")
    comp = composition(head_circuits(m), "V", null="random", null_samples=512)
    d = m.d_model
    # a random unit write direction has E[CS_i^2] = 1/d against any reader
    assert np.mean(comp.null_mean ** 2 + comp.null_std ** 2) == pytest.approx(1 / d, rel=0.15)
    edges = comp.channels(z=2.0)
    for e in edges:
        assert e["reader"][0] > e["writer"][0] and e["z"] > 2.0
    assert edges == sorted(edges, key=lambda e: -e["z"])


def test_encoder_without_folding_and_bad_mode(tiny):
    circ = head_circuits(tiny("bert"))  # post-norm: nothing to fold
    assert circ.W_Q.shape == (3, 4, 32, 8)
    with pytest.raises(LensbenchError, match="unknown composition mode"):
        composition(circ, "X")


def test_model_without_head_weights_is_a_clear_error(tiny):
    from lensbench.adapters import Adapter, Tap

    class NoHeads(Adapter):
        family = "opaque"
        layers = "layers"
        attn = "self_attn"
        ln1, ln2 = "input_layernorm", "post_attention_layernorm"
        attn_out, mlp_out, resid_mid = Tap("self_attn", "output"), Tap("mlp", "output"), None

    ref = tiny("llama")
    m = lensbench.Model(ref.module, ref.tokenizer, NoHeads(ref.module), {"name": "opaque"})
    with pytest.raises(LensbenchError, match="no per-head attention weights"):
        head_circuits(m)


def test_noncausal_null_comes_from_writers_that_cannot_feed_the_reader(tiny):
    m = tiny("llama")
    circ = head_circuits(m)
    comp = composition(circ, "Q")  # default null="noncausal"
    assert np.isnan(comp.null_mean[0]).all()  # nothing can feed layer 0: no null, no edges into it
    full = composition(circ, "Q", null="random")
    np.testing.assert_allclose(comp.scores, full.scores)  # the null does not change the scores
    # the null of reader (2, h) pools the component scores of writers in layer 2 (same layer) against it
    H = m.adapter.n_heads
    ov, qk = circ.ov(), circ.qk()
    P = qk.U[2] * qk.S[2][:, None, :] / qk.S[2].norm(dim=-1)[:, None, None]  # [H, d, r]
    pool = torch.einsum("wid,hdb->wihb", ov.Vt[2], P).square().sum(-1).sqrt().reshape(-1, H)
    np.testing.assert_allclose(comp.null_mean[2], pool.mean(0).double().numpy(), rtol=1e-5)
    assert all(e["reader"][0] > 0 for e in comp.channels(z=1.0))
    with pytest.raises(LensbenchError, match="unknown null"):
        composition(circ, "Q", null="bogus")


def test_laundry_prompts_and_limits(tiny):
    from lensbench.analyses.laundry import accuracy, make_prompts, single_token_items

    m = tiny("llama")
    items = single_token_items(m)
    assert items and all(len(m.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in items)
    prompts = make_prompts(m, 2, 6, seed=0)
    assert [p.missing_position for p in prompts] == [0, 1, 0, 1, 0, 1]
    for p in prompts:
        assert p.answer in p.items and p.text.count(p.answer) == 1  # listed once, never bought
    result = accuracy(m, prompts)
    assert 0 <= result["accuracy_top1"] <= result["accuracy_among_items"] <= 1
    with pytest.raises(LensbenchError, match="only .* single tokens"):
        make_prompts(m, len(items) + 1, 3)


@pytest.mark.real
def test_laundry_on_smollm2_capacity_falls_with_n(smollm):
    from lensbench.analyses.laundry import accuracy_curve

    curve = accuracy_curve(smollm, (2, 8), count=20)
    assert curve[0]["accuracy_among_items"] > 0.8 > curve[1]["accuracy_among_items"] + 0.3
