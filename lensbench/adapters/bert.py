"""BERT-style encoders (BERT, MiniLM): post-norm, so resid_mid is LayerNorm(resid_pre + attn_out)
and the sublayer contributions are read before the LayerNorm that follows them."""
from __future__ import annotations

from .base import Adapter, HeadWeights, Tap, register


@register("BertModel", "BertForMaskedLM")
class BertAdapter(Adapter):
    family = "bert"
    is_causal_lm = False
    layers = "encoder.layer"
    attn = "attention.self"
    ln1 = None
    ln2 = None
    attn_out = Tap("attention.output.dense", "output")
    mlp_out = Tap("output.dense", "output")
    resid_mid = Tap("attention.output", "output")

    def head_weights(self, layer: int) -> HeadWeights:
        blk = self.blocks[layer]
        s, o = blk.attention.self, blk.attention.output.dense
        H = self.n_heads
        return HeadWeights(
            W_Q=self._split_heads_in(s.query.weight, H),
            W_K=self._split_heads_in(s.key.weight, H),
            W_V=self._split_heads_in(s.value.weight, H),
            W_O=self._split_heads_out(o.weight),
            b_Q=self._bias(s.query, H), b_K=self._bias(s.key, H), b_V=self._bias(s.value, H),
            b_O=self._bias(o),
        )
