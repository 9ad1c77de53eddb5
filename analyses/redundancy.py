"""Layer redundancy from one capture pass (METHODS.md §4, §5, §7, §9).

Per layer l, with h = resid_pre, a = attn_out, mid = resid_mid, m = mlp_out, h' = resid_post,
averaged per token over content tokens (padding and special tokens excluded; for causal LMs the
first position too, since its massive norm dominates cosines; it is reported separately):

  block_cosine      cos(h, h')       LLM-Drop block drop / ShortGPT (BI = 1 - cos) / LIM (= -cos)
  attn_cosine       cos(h, mid)      LLM-Drop attention drop (layer_drop_norm=True)
  mlp_cosine        cos(mid, h')     LLM-Drop MLP drop
      higher cosine = the unit changes the stream less = less important (drop first)
  {attn,mlp,layer}_relative_contribution   ||a||/||h||, ||m||/||mid||, ||h'-h||/||h||   (Csordás et al.)
  {attn,mlp,layer}_residual_cosine         cos(a, h), cos(m, mid), cos(h'-h, h)         (descriptive)
  cka               linear CKA between residual states h_0..h_L on a token sample (matrix)
  logit_lens_kl_nats   KL(p_l || p_final) of the logit lens applied to the input of layer l (causal LMs)
  logit_lens_top5_overlap   fraction of the final top-5 tokens in the logit lens's top-5
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model import Model
from ..profile import LayerScores
from ..trace import Trace
from .base import Analyzer, register

EPS = 1e-6


def token_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis, in float64."""
    x, y = x.double(), y.double()
    return (x * y).sum(-1) / (x.norm(dim=-1).clamp_min(EPS) * y.norm(dim=-1).clamp_min(EPS))


def relative_norm(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x.double().norm(dim=-1) / ref.double().norm(dim=-1).clamp_min(EPS)


def linear_cka(states: torch.Tensor) -> np.ndarray:
    """[n_states, n_tokens, d] -> [n_states, n_states] linear CKA (Kornblith et al. 2019)."""
    x = states.double()
    x = x - x.mean(dim=1, keepdim=True)
    gram = torch.einsum("snd,smd->snm", x, x).flatten(1)  # centred Gram matrices, one row each
    hsic = gram @ gram.T
    norm = hsic.diagonal().sqrt().clamp_min(1e-30)
    return (hsic / norm[:, None] / norm[None, :]).numpy()


def analysis_mask(trace: Trace, causal: bool, exclude_first_token: bool) -> torch.Tensor:
    mask = trace.content_mask.clone()
    if causal and exclude_first_token:
        mask[:, 0] = False
    return mask


PER_TOKEN = {
    # name: (function of the per-layer site tensors, higher_is_more_important, description)
    "block_cosine": (lambda s: token_cosine(s["pre"], s["post"]), False, "cos(resid_pre, resid_post)"),
    "attn_cosine": (lambda s: token_cosine(s["pre"], s["mid"]), False, "cos(resid_pre, resid_mid)"),
    "mlp_cosine": (lambda s: token_cosine(s["mid"], s["post"]), False, "cos(resid_mid, resid_post)"),
    "attn_relative_contribution": (lambda s: relative_norm(s["attn"], s["pre"]), True, "||attn_out|| / ||resid_pre||"),
    "mlp_relative_contribution": (lambda s: relative_norm(s["mlp"], s["mid"]), True, "||mlp_out|| / ||resid_mid||"),
    "layer_relative_contribution": (lambda s: relative_norm(s["post"] - s["pre"], s["pre"]), True,
                                    "||resid_post - resid_pre|| / ||resid_pre||"),
    "attn_residual_cosine": (lambda s: token_cosine(s["attn"], s["pre"]), None, "cos(attn_out, resid_pre)"),
    "mlp_residual_cosine": (lambda s: token_cosine(s["mlp"], s["mid"]), None, "cos(mlp_out, resid_mid)"),
    "layer_residual_cosine": (lambda s: token_cosine(s["post"] - s["pre"], s["pre"]), None,
                              "cos(resid_post - resid_pre, resid_pre)"),
}
SITE_KEYS = {"pre": "hook_resid_pre", "attn": "hook_attn_out", "mid": "hook_resid_mid", "mlp": "hook_mlp_out",
             "post": "hook_resid_post"}


@register
@dataclass
class Redundancy(Analyzer):
    """Input/output similarity and relative contribution of every block and sublayer."""

    name = "redundancy"
    sites = tuple(SITE_KEYS.values())

    exclude_first_token: bool = True
    cka_tokens: int = 1024
    logit_lens_tokens: int = 128
    seed: int = 0

    def start(self, model: Model) -> None:
        self.model_ = model
        self.causal_ = model.is_causal_lm
        L = model.n_layers
        self.sums_ = {k: torch.zeros(L, dtype=torch.float64) for k in PER_TOKEN}
        self.first_sum_ = torch.zeros(L, dtype=torch.float64)
        self.count_ = 0
        self.first_count_ = 0
        self.sample_keys_ = torch.empty(0)
        self.sample_ = torch.empty(L + 1, 0, model.d_model)
        self.gen_ = torch.Generator().manual_seed(self.seed)

    def update(self, trace: Trace) -> None:
        mask = analysis_mask(trace, self.causal_, self.exclude_first_token)
        per_site = {k: trace.stack(v)[:, mask] for k, v in SITE_KEYS.items()}  # [L, N, d]
        for name, (fn, _, _) in PER_TOKEN.items():
            self.sums_[name] += fn(per_site).sum(-1)
        self.count_ += int(mask.sum())
        if self.causal_ and self.exclude_first_token:
            first = trace.attention_mask[:, 0].bool()
            pre0, post0 = trace.stack("hook_resid_pre")[:, first, 0], trace.stack("hook_resid_post")[:, first, 0]
            self.first_sum_ += token_cosine(pre0, post0).sum(-1)
            self.first_count_ += int(first.sum())
        # Reservoir of residual states h_0..h_L (uniform over tokens) for CKA and the logit lens.
        states = torch.cat([per_site["pre"], per_site["post"][-1:]], dim=0)  # [L+1, N, d]
        keys = torch.rand(states.shape[1], generator=self.gen_)
        all_keys = torch.cat([self.sample_keys_, keys])
        keep = all_keys.argsort(descending=True)[: max(self.cka_tokens, self.logit_lens_tokens)]
        self.sample_ = torch.cat([self.sample_, states.float()], dim=1)[:, keep]
        self.sample_keys_ = all_keys[keep]

    def finish(self) -> list[LayerScores]:
        if self.count_ == 0:
            raise ValueError("redundancy: no content tokens were seen (all texts empty or special tokens only)")
        common = dict(analysis=self.name, params={**self.params(), "n_tokens": self.count_})
        out = [LayerScores(name, (self.sums_[name] / self.count_).numpy(), direction, description=desc, **common)
               for name, (_, direction, desc) in PER_TOKEN.items()]
        if self.first_count_:
            out.append(LayerScores("block_cosine_first_token", (self.first_sum_ / self.first_count_).numpy(), None,
                                   description="cos(resid_pre, resid_post) at position 0 only", **common))
        cka_states = self.sample_[:, : self.cka_tokens]
        out.append(LayerScores("cka", linear_cka(cka_states), None, axes=("state", "state"),
                               description="linear CKA between residual states h_0..h_L (h_l = input of layer l)",
                               **{**common, "params": {**common["params"], "n_tokens": cka_states.shape[1]}}))
        if self.causal_:
            out.extend(self._logit_lens(common))
        return out

    @torch.no_grad()
    def _logit_lens(self, common: dict) -> list[LayerScores]:
        adapter = self.model_.adapter
        states = self.sample_[:, : self.logit_lens_tokens]
        dtype = next(self.model_.module.parameters()).dtype
        final = torch.log_softmax(adapter.unembed(states[-1].to(dtype)).double(), -1)
        top_final = final.topk(5, dim=-1).indices
        kl, overlap = [], []
        for h in states[:-1]:
            logp = torch.log_softmax(adapter.unembed(h.to(dtype)).double(), -1)
            kl.append(float((logp.exp() * (logp - final)).sum(-1).mean()))
            top = logp.topk(5, dim=-1).indices
            overlap.append(float((top[:, :, None] == top_final[:, None, :]).any(-1).float().mean()))
        params = {**common["params"], "n_tokens": states.shape[1]}
        return [
            LayerScores("logit_lens_kl_nats", np.array(kl), None, analysis=self.name, params=params,
                        description="KL(logit lens at the input of layer l || final distribution), nats"),
            LayerScores("logit_lens_top5_overlap", np.array(overlap), None, analysis=self.name, params=params,
                        description="share of the final top-5 tokens in the logit lens top-5 at layer l's input"),
        ]

