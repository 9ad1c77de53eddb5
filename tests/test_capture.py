import pytest
import torch

from lensbench import LensbenchError, capture
from lensbench.adapters import SITES, site_name
from lensbench.testing import TINY_ARCHS, no_hooks_left

ALL_ARCHS = TINY_ARCHS


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_backends_identical(tiny, texts, arch):
    m = tiny(arch)
    sites = SITES + ("ln1.hook_normalized", "ln2.hook_normalized")
    a = capture(m, texts[:3], sites=sites)
    b = capture(m, texts[:3], sites=sites, backend="nnsight")
    assert set(a.keys()) == set(b.keys()) == {site_name(i, s) for i in range(m.n_layers) for s in sites}
    for k in a.keys():
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_sites_match_hidden_states_and_residual_algebra(tiny, texts, arch):
    m = tiny(arch)
    batch = m.tokenize(texts[:3])
    tr, out = capture(m, batch, return_output=True)
    hs = m.module(**batch.model_inputs(), output_hidden_states=True).hidden_states
    for i in range(m.n_layers):
        torch.testing.assert_close(tr[site_name(i, "hook_resid_pre")], hs[i])
        if i + 1 < m.n_layers:
            torch.testing.assert_close(tr[site_name(i, "hook_resid_post")], hs[i + 1])
        pre, attn, mid, mlp, post = (tr[site_name(i, s)] for s in SITES)
        if m.adapter.family != "bert":  # pre-norm / parallel: the stream is a plain sum
            torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=1e-5)
        else:  # post-norm: LayerNorm after each sum
            blk = m.adapter.blocks[i]
            torch.testing.assert_close(mid, blk.attention.output.LayerNorm(pre + attn), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(post, blk.output.LayerNorm(mid + mlp), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_positions_last_and_mean(tiny, texts, arch):
    m = tiny(arch)
    full = capture(m, texts)
    last = capture(m, texts, positions="last")
    mean = capture(m, texts, positions="mean")
    mask = full.attention_mask.bool()
    for k in full.keys():
        for b in range(mask.shape[0]):
            real = full[k][b][mask[b]]
            torch.testing.assert_close(last[k][b], real[-1])
            torch.testing.assert_close(mean[k][b], real.mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt_neox"])
def test_padding_does_not_change_real_tokens(tiny, texts, arch):
    """A text captured alone equals the same text captured inside a padded batch."""
    m = tiny(arch)
    short = min(texts, key=len)
    batched = capture(m, [short, max(texts, key=len)])
    alone = capture(m, [short])
    n = int(alone.attention_mask.sum())
    assert int(batched.attention_mask[0].sum()) == n < batched.attention_mask.shape[1]
    for k in alone.keys():
        torch.testing.assert_close(batched[k][0, :n], alone[k][0], atol=1e-5, rtol=1e-5)


def test_hooks_removed_after_exception(tiny, texts):
    m = tiny("llama")
    target = m.adapter.blocks[1].mlp

    def boom(*_):
        raise RuntimeError("boom")

    handle = target.register_forward_hook(boom)
    try:
        with no_hooks_left(m.module):
            with pytest.raises(RuntimeError, match="boom"):
                capture(m, texts[:2])
            with pytest.raises(RuntimeError, match="boom"):
                capture(m, texts[:2], backend="nnsight")
    finally:
        handle.remove()
    with no_hooks_left(m.module):
        capture(m, texts[:2])


def test_layer_subset_and_dtype(tiny, texts):
    m = tiny("llama")
    tr = capture(m, texts[:2], sites=["hook_resid_post"], layers=[0, 2], dtype=torch.float16)
    assert sorted(tr.keys()) == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    assert tr["blocks.2.hook_resid_post"].dtype == torch.float16
    assert tr.stack("hook_resid_post").shape[0] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(sites=["hook_nope"]), "unknown site"),
    (dict(layers=[7]), "out of range"),
    (dict(positions="first"), "unknown positions"),
    (dict(backend="tl"), "unknown capture backend"),
])
def test_bad_capture_arguments(tiny, texts, kwargs, message):
    with pytest.raises(LensbenchError, match=message):
        capture(tiny("llama"), texts[:1], **kwargs)


def test_text_longer_than_context_is_an_error(tiny):
    m = tiny("llama")
    long_text = " ".join(["budget"] * 300)
    with pytest.raises(LensbenchError, match="longer than the model's context of 128"):
        capture(m, [long_text])
    tr = capture(m, [long_text], max_length=16)  # explicit truncation is fine
    assert tr.attention_mask.shape[1] == 16
