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
    out_proj = "self_attn.o_proj"
    ln1 = "input_layernorm"
    ln2 = "post_attention_layernorm"
    attn_out = Tap("self_attn", "output")
    mlp_out = Tap("mlp", "output")
    resid_mid = Tap("post_attention_layernorm", "input")
    final_norm = "norm"

    def head_weights(self, layer: int) -> HeadWeights:
        a = self.blocks[layer].get_submodule(self.attn)
        return self._from_linears(a.q_proj, a.k_proj, a.v_proj, a.o_proj)
