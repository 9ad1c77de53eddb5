"""Llama-family decoders (Llama, Qwen2/3, Mistral): pre-norm, separate q/k/v/o projections, GQA."""
from __future__ import annotations

from .base import Adapter, HeadWeights, Tap, register


@register(
    "LlamaForCausalLM", "LlamaModel",
    "Qwen2ForCausalLM", "Qwen2Model",
    "Qwen3ForCausalLM", "Qwen3Model",
    "MistralForCausalLM", "MistralModel",
)
class LlamaAdapter(Adapter):
    family = "llama"
    layers = "layers"
    attn = "self_attn"
    ln1 = "input_layernorm"
    ln2 = "post_attention_layernorm"
    attn_out = Tap("self_attn", "output")
    mlp_out = Tap("mlp", "output")
    resid_mid = Tap("post_attention_layernorm", "input")
    final_norm = "norm"
    o_proj = "o_proj"

    def head_weights(self, layer: int) -> HeadWeights:
        a = self.blocks[layer].get_submodule(self.attn)
        o = a.get_submodule(self.o_proj)
        H, K = self.n_heads, self.n_kv_heads
        return HeadWeights(
            W_Q=self._split_heads_in(a.q_proj.weight, H),
            W_K=self._split_heads_in(a.k_proj.weight, K),
            W_V=self._split_heads_in(a.v_proj.weight, K),
            W_O=self._split_heads_out(o.weight),
            b_Q=self._bias(a.q_proj, H), b_K=self._bias(a.k_proj, K), b_V=self._bias(a.v_proj, K),
            b_O=self._bias(o),
        )
