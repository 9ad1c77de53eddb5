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
    mlp = "intermediate"
    sublayer_drop = False  # post-norm: a sublayer's LayerNorm also normalises the residual
    out_proj = "attention.output.dense"
    ln1 = None
    ln2 = None
    attn_out = Tap("attention.output.dense", "output")
    mlp_out = Tap("output.dense", "output")
    resid_mid = Tap("attention.output", "output")

    def head_weights(self, layer: int) -> HeadWeights:
        blk = self.blocks[layer]
        s = blk.attention.self
        return self._from_linears(s.query, s.key, s.value, blk.attention.output.dense)
