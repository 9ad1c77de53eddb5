"""Gemma decoders. Gemma 1 is Llama-shaped; Gemma 2/3 add a norm after each sublayer, so what a
sublayer adds to the residual is the output of that post-norm, not of the sublayer itself."""
from __future__ import annotations

from .base import Tap, register
from .llama import LlamaAdapter
import torch


@register("GemmaForCausalLM", "GemmaModel")
class GemmaAdapter(LlamaAdapter):
    family = "gemma"


@register("Gemma2ForCausalLM", "Gemma2Model", "Gemma3ForCausalLM", "Gemma3TextModel")
class Gemma2Adapter(LlamaAdapter):
    family = "gemma2"
    ln2 = "pre_feedforward_layernorm"
    attn_out = Tap("post_attention_layernorm", "output")
    mlp_out = Tap("post_feedforward_layernorm", "output")
    resid_mid = Tap("pre_feedforward_layernorm", "input")

    def head(self, normed):
        """Gemma 2/3 soft-cap the logits after the head; the logit lens must do the same."""

        logits = super().head(normed)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def linear_head(self):
        return None if getattr(self.config, "final_logit_softcapping", None) else super().linear_head()
