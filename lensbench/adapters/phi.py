"""Phi-1/1.5/2: one shared input norm, attention and MLP in parallel on it."""
from __future__ import annotations

from .base import Adapter, HeadWeights, Tap, register


@register("PhiForCausalLM", "PhiModel")
class PhiAdapter(Adapter):
    family = "phi"
    layers = "layers"
    attn = "self_attn"
    ln1 = "input_layernorm"
    ln2 = None
    attn_out = Tap("self_attn", "output")
    mlp_out = Tap("mlp", "output")
    resid_mid = None  # parallel: computed as resid_pre + attn_out
    final_norm = "final_layernorm"

    def head_weights(self, layer: int) -> HeadWeights:
        a = self.blocks[layer].self_attn
        H, K = self.n_heads, self.n_kv_heads
        return HeadWeights(
            W_Q=self._split_heads_in(a.q_proj.weight, H),
            W_K=self._split_heads_in(a.k_proj.weight, K),
            W_V=self._split_heads_in(a.v_proj.weight, K),
            W_O=self._split_heads_out(a.dense.weight),
            b_Q=self._bias(a.q_proj, H), b_K=self._bias(a.k_proj, K), b_V=self._bias(a.v_proj, K),
            b_O=self._bias(a.dense),
        )
