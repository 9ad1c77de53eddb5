import pytest
import torch

import lensbench
from lensbench import capture
from lensbench.adapters import Adapter, Tap, adapter_for, register, registered, site_name
from lensbench.errors import UnknownArchitectureError
from lensbench.testing import TINY_ARCHS


def test_required_families_are_registered():
    families = {cls.family for cls in registered().values()}
    assert {"gpt2", "llama", "gpt_neox", "gemma", "phi", "bert"} <= families
    for name in ("Qwen2ForCausalLM", "MistralForCausalLM", "LlamaForCausalLM"):
        assert registered()[name].family == "llama"


def test_unknown_architecture_names_what_to_register():
    import transformers as T

    cfg = T.OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=50,
                      word_embed_proj_dim=16, max_position_embeddings=32)
    model = T.OPTForCausalLM(cfg)
    with pytest.raises(UnknownArchitectureError, match=r"register\('OPTForCausalLM'\)"):
        adapter_for(model)


def test_registration_extends_without_editing_core():
    import transformers as T

    @register("OPTForCausalLM")
    class OPTAdapter(Adapter):
        family = "opt"
        layers = "decoder.layers"
        attn = "self_attn"
        ln1, ln2 = "self_attn_layer_norm", "final_layer_norm"
        attn_out = Tap("self_attn", "output")
        mlp_out = Tap("fc2", "output")
        resid_mid = Tap("final_layer_norm", "input")

    try:
        cfg = T.OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=600,
                          word_embed_proj_dim=16, max_position_embeddings=64)
        from lensbench.testing import tiny_tokenizer

        m = lensbench.load(T.OPTForCausalLM(cfg).eval(), tokenizer=tiny_tokenizer())
        tr = capture(m, ["a test of the city budget"])
        assert m.adapter.family == "opt" and len(tr.keys()) == 10
    finally:
        from lensbench.adapters import base

        base._REGISTRY.pop("OPTForCausalLM")


def _attention_probs(m, batch):
    out = m.module(**batch.model_inputs(), output_attentions=True)
    return out.attentions


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_head_weights_reproduce_attention_output(tiny, texts, arch):
    """sum_h A_h (x W_V[kv(h)] + b_V) W_O[h] + b_O equals the captured attention output (GQA included)."""
    m = tiny(arch)
    batch = m.tokenize(texts[:2])
    tr = capture(m, batch, sites=["ln1.hook_normalized", "hook_attn_out"])
    probs = _attention_probs(m, batch)
    for layer in range(m.n_layers):
        w = m.adapter.head_weights(layer)
        assert w.W_Q.shape == (m.adapter.n_heads, m.d_model, m.adapter.d_head)
        assert w.W_K.shape[0] == m.adapter.n_kv_heads
        x = tr[site_name(layer, "ln1.hook_normalized")]
        A = probs[layer]  # [B, H, T, T]
        ew = w.expand_kv()
        v = torch.einsum("btd,hde->bhte", x, ew.W_V) + (ew.b_V[None, :, None] if ew.b_V is not None else 0)
        z = torch.einsum("bhqk,bhke->bhqe", A, v)
        out = torch.einsum("bhqe,hed->bqd", z, w.W_O) + (w.b_O if w.b_O is not None else 0)
        target = tr[site_name(layer, "hook_attn_out")]
        if arch == "gemma2":  # Gemma 2 normalises the attention output before adding it
            out = m.adapter.blocks[layer].post_attention_layernorm(out)
        mask = batch.attention_mask.bool()
        torch.testing.assert_close(out[mask], target[mask], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_head_weights_reproduce_attention_pattern(tiny, texts, arch):
    """Without rotary embeddings, softmax((x W_Q + b_Q)(x W_K + b_K)^T / sqrt(d_head)) is the pattern."""
    m = tiny(arch)
    batch = m.tokenize(texts[:2])
    tr = capture(m, batch, sites=["ln1.hook_normalized"])
    probs = _attention_probs(m, batch)
    T = batch.input_ids.shape[1]
    for layer in range(m.n_layers):
        w = m.adapter.head_weights(layer)
        x = tr[site_name(layer, "ln1.hook_normalized")]
        q = torch.einsum("btd,hde->bhte", x, w.W_Q) + w.b_Q[None, :, None]
        k = torch.einsum("btd,hde->bhte", x, w.W_K) + w.b_K[None, :, None]
        scores = q @ k.transpose(-1, -2) / m.adapter.d_head ** 0.5
        allowed = batch.attention_mask.bool()[:, None, None, :].expand(-1, 1, T, T)
        if arch == "gpt2":
            allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
        rows = batch.attention_mask.bool()
        torch.testing.assert_close(scores.softmax(-1).permute(0, 2, 1, 3)[rows],
                                   probs[layer].permute(0, 2, 1, 3)[rows], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "bert"])
def test_unembedding_the_last_block_output_gives_the_logits(tiny, texts, arch):
    m = tiny(arch)
    assert m.is_causal_lm
    tr, out = capture(m, texts[:2], sites=["hook_resid_post"], layers=[m.n_layers - 1], return_output=True)
    with torch.no_grad():
        logits = m.adapter.unembed(tr[site_name(m.n_layers - 1, "hook_resid_post")])
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)


def test_bare_base_model_has_no_lm_head(tiny):
    from lensbench.load import from_module

    m = tiny("llama")
    base = from_module(m.module.model, tokenizer=m.tokenizer)
    assert not base.is_causal_lm and base.n_layers == m.n_layers
    assert base.adapter.block_path(1) == "layers.1" and m.adapter.block_path(1) == "model.layers.1"
