"""Redundancy metrics against slow, independent computations from output_hidden_states."""
import numpy as np
import pytest
import torch

import lensbench
from analyses_reference import cka_feature_space, masked_mean_cosine


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi", "bert"])
def test_block_metrics_match_hidden_states(tiny, texts, arch):
    m = tiny(arch)
    prof = lensbench.profile_model(m, texts, batch_size=4, progress=False)  # 2 batches: streaming path
    batch = m.tokenize(texts)
    with torch.no_grad():
        hs = m.module(**batch.model_inputs(), output_hidden_states=True).hidden_states
    mask = batch.content_mask.clone()
    if m.is_causal_lm:
        mask[:, 0] = False
    n = m.n_layers
    last = (n - 1) if m.is_causal_lm else n  # causal LMs: HF's last hidden state is after the final norm
    expected = [masked_mean_cosine(hs[i], hs[i + 1], mask) for i in range(last)]
    np.testing.assert_allclose(prof["block_cosine"].values[:last], expected, atol=1e-6)
    rc = [float(((hs[i + 1] - hs[i]).double().norm(dim=-1) / hs[i].double().norm(dim=-1))[mask].mean())
          for i in range(last)]
    np.testing.assert_allclose(prof["layer_relative_contribution"].values[:last], rc, rtol=1e-6)


def test_cka_matches_feature_space_formula(tiny, texts):
    m = tiny("llama")
    prof = lensbench.profile_model(m, texts, progress=False, analysis_params={"redundancy": {"cka_tokens": 10_000}})
    batch = m.tokenize(texts)
    with torch.no_grad():
        hs = m.module(**batch.model_inputs(), output_hidden_states=True).hidden_states
    mask = batch.content_mask.clone()
    mask[:, 0] = False
    from lensbench import capture

    tr = capture(m, batch, sites=["hook_resid_post"], layers=[m.n_layers - 1])
    states = [h[mask] for h in hs[:-1]] + [tr[f"blocks.{m.n_layers - 1}.hook_resid_post"][mask]]
    cka = prof["cka"].values
    assert cka.shape == (m.n_layers + 1, m.n_layers + 1)
    for i in range(len(states)):
        for j in range(len(states)):
            assert cka[i, j] == pytest.approx(cka_feature_space(states[i], states[j]), abs=1e-8)
    np.testing.assert_allclose(np.diag(cka), 1.0)


def test_logit_lens_matches_manual(tiny, texts):
    m = tiny("llama")
    prof = lensbench.profile_model(m, texts[:2], progress=False,
                                   analysis_params={"redundancy": {"logit_lens_tokens": 10_000}})
    batch = m.tokenize(texts[:2])
    with torch.no_grad():
        out = m.module(**batch.model_inputs(), output_hidden_states=True)
    mask = batch.content_mask.clone()
    mask[:, 0] = False
    final = torch.log_softmax(out.logits[mask].double(), -1)
    for i in range(m.n_layers):
        logits = m.module.lm_head(m.module.model.norm(out.hidden_states[i]))[mask].detach()
        logp = torch.log_softmax(logits.double(), -1)
        kl = float((logp.exp() * (logp - final)).sum(-1).mean())
        # two float32 paths to a KL of ~5e-4 nats: the CPU's SIMD width alone moves it by ~1e-4 relative
        assert prof["logit_lens_kl_nats"].values[i] == pytest.approx(kl, rel=5e-4)


def test_encoder_has_no_logit_lens_and_first_token_is_kept(tiny, texts):
    prof = lensbench.profile_model(tiny("bert"), texts, progress=False)
    assert "logit_lens_kl_nats" not in prof.scores and "block_cosine_first_token" not in prof.scores
    assert prof["block_cosine"].higher_is_more_important is False
    assert prof["layer_relative_contribution"].higher_is_more_important is True


def test_batch_size_does_not_change_means(tiny, texts):
    m = tiny("qwen2")
    a = lensbench.profile_model(m, texts, batch_size=1, progress=False)
    b = lensbench.profile_model(m, texts, batch_size=6, progress=False)
    for name in ("block_cosine", "attn_cosine", "mlp_cosine", "mlp_relative_contribution"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-5, atol=1e-6)
