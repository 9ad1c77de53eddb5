"""lensbench's native decode attention (`gpu/native/attention.cpp`, `lensbench.native_attention`): the op against
softmax attention computed in float64 (grouped key/value heads, boolean masks as a static cache's, masks broadcast
over heads, no mask, several query rows, strided queries, head sizes that are not a multiple of 16, a row that
attends to nothing), transformers' own models through it, and what it hands to SDPA."""
import pytest
import torch

from lensbench.gpu import cpu_native

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason=f"{cpu_native.unavailable()}")


def _reference(q, k, v, mask, scaling):
    """[B, H, Q, D] x [B, Hkv, L, D] -> [B, Q, H, D] in float64; rows attending to nothing give zeros."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(2, 3) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def _static_cache_mask(batch, rows, length, filled):
    """A static cache's mask at a decode step: query row r of `rows` sits at position filled - rows + r."""
    pos = torch.arange(length)
    query = filled - rows + torch.arange(rows)
    return (pos[None, :] <= query[:, None])[None, None].expand(batch, 1, rows, length)


@pytest.mark.parametrize("batch,heads,kv_heads,rows,length,filled,d", [
    (1, 9, 3, 1, 162, 130, 64),  # SmolLM2's decode step over a static cache
    (2, 4, 4, 1, 40, 17, 40),  # no grouping; a head size of 40 (a 16-lane tail)
    (1, 8, 2, 3, 33, 33, 16),  # several query rows, causal within them
    (3, 2, 1, 1, 50, 1, 8),  # a head size below 16; one position filled
])
def test_matches_softmax_attention(batch, heads, kv_heads, rows, length, filled, d):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, rows, heads, d, generator=g).transpose(1, 2)  # strided, as the models make it
    k = torch.randn(batch, kv_heads, length, d, generator=g)
    v = torch.randn(batch, kv_heads, length, d, generator=g)
    k[:, :, filled:] = v[:, :, filled:] = 1e4  # what the mask drops must never be read
    mask = _static_cache_mask(batch, rows, length, filled)
    got = torch.ops.lensbench_native.decode_attention(q, k, v, mask, d ** -0.5)
    torch.testing.assert_close(got.double(), _reference(q, k, v, mask, d ** -0.5), rtol=1e-5, atol=1e-5)


def test_no_mask_attends_everywhere_and_a_row_with_nothing_kept_is_zero():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 2, 32, generator=g)
    k, v = (torch.randn(2, 2, 2, 32, generator=g) for _ in range(2))  # two query heads per key/value head
    got = torch.ops.lensbench_native.decode_attention(q, k, v, None, 0.3)
    torch.testing.assert_close(got.double(), _reference(q, k, v, None, 0.3), rtol=1e-5, atol=1e-5)
    mask = torch.ones(2, 4, 2, 2, dtype=torch.bool)  # per query head
    mask[1, 2, 0] = False
    mask[0, 1, 1, 0] = False
    got = torch.ops.lensbench_native.decode_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(got.double(), _reference(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1, 0, 2], torch.zeros(32))
    strided = mask.transpose(2, 3).contiguous().transpose(2, 3)  # the positions not adjacent in memory
    assert strided.stride(3) != 1
    assert torch.equal(torch.ops.lensbench_native.decode_attention(q, k, v, strided, 0.3), got)


def test_bad_input_is_refused():
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="H a multiple of Hkv"):
        torch.ops.lensbench_native.decode_attention(q, torch.zeros(1, 3, 5, 16), torch.zeros(1, 3, 5, 16), None, 1.0)
    with pytest.raises(RuntimeError, match="H a multiple of Hkv"):  # no key/value head at all
        torch.ops.lensbench_native.decode_attention(q, torch.zeros(1, 0, 5, 16), torch.zeros(1, 0, 5, 16), None, 1.0)
    with pytest.raises(RuntimeError, match="4-d bool"):
        torch.ops.lensbench_native.decode_attention(q, torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16),
                                                    torch.zeros(1, 1, 1, 5), 1.0)


def test_models_run_through_it_and_hand_the_rest_to_sdpa():
    from torch.profiler import profile

    from lensbench.decoding import attention
    from lensbench.native_attention import NAME, native_attention
    from lensbench.testing import tiny_model

    model = tiny_model("llama", seed=3, attn="sdpa")
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.module(input_ids=ids).logits
        with attention(model.module, NAME), profile() as prof:
            got = model.module(input_ids=ids).logits
    calls = [e for e in prof.events() if e.name == "lensbench_native::decode_attention"]
    assert len(calls) == model.module.config.num_hidden_layers  # every layer, the prompt causal by its mask
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # half precision is SDPA's
    module = next(m for m in model.module.modules() if type(m).__name__.endswith("Attention"))
    q, k = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16), torch.randn(1, 4, 3, 16, dtype=torch.bfloat16)
    with profile() as prof:
        out, _ = native_attention(module, q, k, k, None, scaling=0.25)
    assert out.shape == (1, 1, 4, 16) and out.dtype == torch.bfloat16
    assert not [e for e in prof.events() if e.name == "lensbench_native::decode_attention"]
