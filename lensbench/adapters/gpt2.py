"""GPT-2: pre-norm, fused c_attn (Conv1D, weights stored [in, out])."""
from __future__ import annotations

from .base import Adapter, HeadWeights, Tap, register


@register("GPT2LMHeadModel", "GPT2Model")
class GPT2Adapter(Adapter):
    family = "gpt2"
    layers = "h"
    attn = "attn"
    out_proj = "attn.c_proj"
    ln1 = "ln_1"
    ln2 = "ln_2"
    attn_out = Tap("attn", "output")
    mlp_out = Tap("mlp", "output")
    resid_mid = Tap("ln_2", "input")
    final_norm = "ln_f"

    @property
    def d_model(self) -> int:
        return self.config.n_embd

    @property
    def n_heads(self) -> int:
        return self.config.n_head

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def head_weights(self, layer: int) -> HeadWeights:
        a = self.blocks[layer].attn
        d, H, dh = self.d_model, self.n_heads, self.d_head
        w = a.c_attn.weight.detach()  # [d, 3d], x @ w
        b = a.c_attn.bias.detach()
        wq, wk, wv = (w[:, i * d:(i + 1) * d].reshape(d, H, dh).transpose(0, 1) for i in range(3))
        bq, bk, bv = (b[i * d:(i + 1) * d].reshape(H, dh) for i in range(3))
        return HeadWeights(
            W_Q=wq, W_K=wk, W_V=wv,
            W_O=a.c_proj.weight.detach().reshape(H, dh, d),
            b_Q=bq, b_K=bk, b_V=bv, b_O=a.c_proj.bias.detach(),
        )
