"""Skip effect (Csordás et al.): the replayed-prefix analyzer against full forwards, and its invariants."""
import numpy as np
import pytest
import torch

from lensbench.analyses.skip_effect import _SkipBefore
from lensbench.surgery import Surgery
from lensbench.profiling import profile_model


def full_forward_output_effect(model, texts, s):
    """Mean ||p - p'|| over content positions >= 1 with block s skipped at positions >= 1, full forwards."""
    ad = model.adapter
    batch = model.tokenize(texts, max_length=128)
    measured = batch.content_mask.clone()
    measured[:, 0] = False
    with torch.no_grad():
        p = torch.softmax(model.module(**batch.model_inputs()).logits[measured].float(), -1)
        surgery = Surgery()
        try:
            surgery.swap(ad.base, f"{ad.layers}.{s}", _SkipBefore(ad.blocks[s], batch.input_ids.shape[1]))
            q = torch.softmax(model.module(**batch.model_inputs()).logits[measured].float(), -1)
        finally:
            surgery.restore()
    return float((p - q).norm(dim=-1).mean())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_output_effect_equals_full_forwards(tiny, texts, arch):
    model = tiny(arch)
    prof = profile_model(model, texts, analyses=("skip_effect",), progress=False)
    got = prof.scores["skip_output_effect"].values
    want = [full_forward_output_effect(model, texts, s) for s in range(model.n_layers)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert prof.scores["skip_output_effect"].higher_is_more_important is True
    assert list(model.adapter.blocks)[0].__class__.__name__ != "_SkipBefore"  # restored


def test_heatmap_invariants(tiny, texts):
    model = tiny("llama")
    L = model.n_layers
    allmode = profile_model(model, texts, analyses=("skip_effect",), progress=False)
    future = profile_model(model, texts, analyses=("skip_effect",), progress=False,
                           analysis_params={"skip_effect": {"mode": "future"}})
    for prof in (allmode, future):
        m = prof.scores["skip_effect_mean"].values
        assert m.shape == (L, L) and np.all(np.tril(m, -1) == 0)  # earlier layers are untouched
    # skipped everywhere measured: the skipped layer's own update is gone entirely
    np.testing.assert_allclose(np.diag(allmode.scores["skip_effect_mean"].values), 1.0, atol=1e-6)
    # future mode measures positions the skipped layer still computes: its own update is unchanged
    np.testing.assert_allclose(np.diag(future.scores["skip_effect_mean"].values), 0.0, atol=1e-5)
    assert np.all(future.scores["skip_effect"].values[:-1, -1] > 0)  # felt later only through attention


def test_bad_mode_is_refused(tiny, texts):
    with pytest.raises(Exception, match="mode must be one of"):
        profile_model(tiny("llama"), texts, analyses=("skip_effect",), progress=False,
                      analysis_params={"skip_effect": {"mode": "sometimes"}})
