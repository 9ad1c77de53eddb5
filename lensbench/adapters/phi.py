"""Phi-1/1.5/2: one shared input norm, attention and MLP in parallel on it."""
from __future__ import annotations

from .base import Adapter, HeadWeights, Tap, register


@register("PhiForCausalLM", "PhiModel")
class PhiAdapter(Adapter):
    family = "phi"
    layers = "layers"
    attn = "self_attn"
    out_proj = "self_attn.dense"
    ln1 = "input_layernorm"
    ln2 = None
    attn_out = Tap("self_attn", "output")
    mlp_out = Tap("mlp", "output")
    resid_mid = None  # parallel: computed as resid_pre + attn_out
    final_norm = "final_layernorm"

    def head_weights(self, layer: int) -> HeadWeights:
        a = self.blocks[layer].self_attn
        return self._from_linears(a.q_proj, a.k_proj, a.v_proj, a.dense)
