"""GPT-NeoX (Pythia): fused per-head-interleaved query_key_value; parallel residual by default."""
from __future__ import annotations

from .base import Adapter, HeadWeights, Tap, register


@register("GPTNeoXForCausalLM", "GPTNeoXModel")
class GPTNeoXAdapter(Adapter):
    family = "gpt_neox"
    layers = "layers"
    attn = "attention"
    out_proj = "attention.dense"
    ln1 = "input_layernorm"
    ln2 = "post_attention_layernorm"
    attn_out = Tap("attention", "output")
    mlp_out = Tap("mlp", "output")
    final_norm = "final_layer_norm"

    @property
    def resid_mid(self):  # type: ignore[override]
        # Parallel blocks never form resid_pre + attn_out: compute it (base class).
        return None if self.config.use_parallel_residual else Tap("post_attention_layernorm", "input")

    def head_weights(self, layer: int) -> HeadWeights:
        a = self.blocks[layer].attention
        H, dh = self.n_heads, self.d_head
        w = a.query_key_value.weight.detach().reshape(H, 3, dh, -1)  # rows: head-major, then q/k/v
        b = a.query_key_value.bias.detach().reshape(H, 3, dh)
        return HeadWeights(
            W_Q=w[:, 0].transpose(1, 2), W_K=w[:, 1].transpose(1, 2), W_V=w[:, 2].transpose(1, 2),
            W_O=self._split_heads_out(a.dense.weight),
            b_Q=b[:, 0], b_K=b[:, 1], b_V=b[:, 2], b_O=self._bias(a.dense),
        )
