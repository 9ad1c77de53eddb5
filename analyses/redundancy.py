"""Layer redundancy from one capture pass (LLM-Drop: He et al., 2024, arXiv 2406.15786; Csordás et al., 2025,
arXiv 2505.13898; Layer-Wise Quantization: Dumitru et al., 2024, arXiv 2406.17415; ShortGPT: Men et al., 2024,
arXiv 2403.03853).

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
from ..profiles import LayerScores
from ..numeric import wide
from ..trace import Trace
from ..analyzer import Analyzer, register

EPS = 1e-6


def token_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis, in float64 (used for the first-token statistics)."""
    x, y = x.double(), y.double()
    return (x * y).sum(-1) / (x.norm(dim=-1).clamp_min(EPS) * y.norm(dim=-1).clamp_min(EPS))


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


# name: (numerator, denominator(s), higher_is_more_important, description). Each metric is a ratio of
# per-token dot products ("a.b") and norms ("|a|") of the site tensors, computed once per layer.
PER_TOKEN = {
    "block_cosine": ("pre.post", ("|pre|", "|post|"), False, "cos(resid_pre, resid_post)"),
    "attn_cosine": ("pre.mid", ("|pre|", "|mid|"), False, "cos(resid_pre, resid_mid)"),
    "mlp_cosine": ("mid.post", ("|mid|", "|post|"), False, "cos(resid_mid, resid_post)"),
    "attn_relative_contribution": ("|attn|", ("|pre|",), True, "||attn_out|| / ||resid_pre||"),
    "mlp_relative_contribution": ("|mlp|", ("|mid|",), True, "||mlp_out|| / ||resid_mid||"),
    "layer_relative_contribution": ("|delta|", ("|pre|",), True, "||resid_post - resid_pre|| / ||resid_pre||"),
    "attn_residual_cosine": ("attn.pre", ("|attn|", "|pre|"), None, "cos(attn_out, resid_pre)"),
    "mlp_residual_cosine": ("mlp.mid", ("|mlp|", "|mid|"), None, "cos(mlp_out, resid_mid)"),
    "layer_residual_cosine": ("delta.pre", ("|delta|", "|pre|"), None, "cos(resid_post - resid_pre, resid_pre)"),
}


def per_token_terms(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Norms and dot products of [n_tokens, d] site tensors, float64 per token."""
    t = dict(t, delta=t["post"] - t["pre"])
    terms = {f"|{k}|": v.norm(dim=-1).double().clamp_min(EPS) for k, v in t.items()}
    for a, b in (("pre", "post"), ("pre", "mid"), ("mid", "post"), ("attn", "pre"), ("mlp", "mid"),
                 ("delta", "pre")):
        terms[f"{a}.{b}"] = (t[a] * t[b]).sum(-1).double()
    return terms


SITE_KEYS = {"pre": "hook_resid_pre", "attn": "hook_attn_out", "mid": "hook_resid_mid", "mlp": "hook_mlp_out",
             "post": "hook_resid_post"}


@register
@dataclass
class Redundancy(Analyzer):
    """Input/output similarity and relative contribution of every block and sublayer."""

    name = "redundancy"
    layer_by_layer = True
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
        n_new = int(mask.sum())
        for layer in range(self.model_.n_layers):
            t = {k: trace[f"blocks.{layer}.{site}"][mask] for k, site in SITE_KEYS.items()}
            terms = per_token_terms(t)
            for name, (num, dens, _, _) in PER_TOKEN.items():
                value = terms[num]
                for d in dens:
                    value = value / terms[d]
                self.sums_[name][layer] += float(value.sum())
        self.count_ += n_new
        if self.causal_ and self.exclude_first_token:
            first = trace.attention_mask[:, 0].bool()
            L = self.model_.n_layers
            pre0 = torch.stack([trace[f"blocks.{i}.hook_resid_pre"][first, 0] for i in range(L)])
            post0 = torch.stack([trace[f"blocks.{i}.hook_resid_post"][first, 0] for i in range(L)])
            self.first_sum_ += token_cosine(pre0, post0).sum(-1)
            self.first_count_ += int(first.sum())
        self._sample(trace, mask, n_new)

    def _sample(self, trace: Trace, mask: torch.Tensor, n_new: int) -> None:
        """Keep a uniform reservoir of residual states h_0..h_L for CKA and the logit lens."""
        keys = torch.rand(n_new, generator=self.gen_)
        all_keys = torch.cat([self.sample_keys_, keys])
        keep = all_keys.argsort(descending=True)[: max(self.cka_tokens, self.logit_lens_tokens)]
        n_old = self.sample_keys_.numel()
        old, new = keep[keep < n_old], keep[keep >= n_old]
        rows = mask.nonzero()[new - n_old]  # (batch, position) of the new tokens that enter the reservoir
        L = self.model_.n_layers
        names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
        gathered = torch.stack([trace[n][rows[:, 0], rows[:, 1]].float() for n in names])
        pool = torch.cat([self.sample_[:, old], gathered], dim=1)
        pool_keys = all_keys[torch.cat([old, new])]
        by_key = pool_keys.argsort(descending=True)  # highest keys first: any prefix is a uniform sample
        self.sample_, self.sample_keys_ = pool[:, by_key], pool_keys[by_key]

    def finish(self) -> list[LayerScores]:
        if self.count_ == 0:
            raise ValueError("redundancy: no content tokens were seen (all texts empty or special tokens only)")
        common = dict(analysis=self.name, params={**self.params(), "n_tokens": self.count_})
        out = [LayerScores(name, (self.sums_[name] / self.count_).numpy(), direction, description=desc, **common)
               for name, (_, _, direction, desc) in PER_TOKEN.items()]
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
    def _logit_lens(self, common: dict, layers_per_matmul: int = 1) -> list[LayerScores]:
        adapter = self.model_.adapter
        states = self.sample_[:, : self.logit_lens_tokens]  # [L+1, n, d]
        L, n = states.shape[0] - 1, states.shape[1]
        dtype = next(self.model_.module.parameters()).dtype
        final = torch.log_softmax(wide(adapter.unembed(states[-1].to(dtype))), -1)  # [n, vocab]
        top_final = final.topk(5, dim=-1).indices
        kl, overlap = [], []
        # one layer per GEMM against the vocabulary: its float64 temporaries (n x vocab each, ~4 alive) stay
        # within a batch's logits, where 8 layers at once would hold 8 times as much
        for start in range(0, L, layers_per_matmul):
            group = states[start:min(start + layers_per_matmul, L)]
            logp = torch.log_softmax(wide(adapter.unembed(group.reshape(-1, group.shape[-1]).to(dtype))), -1)
            logp = logp.reshape(group.shape[0], n, -1)
            kl.extend((logp.exp() * (logp - final)).sum(-1).double().mean(-1).tolist())
            top = logp.topk(5, dim=-1).indices
            overlap.extend((top[..., :, None] == top_final[:, None, :]).any(-1).float().mean((-2, -1)).tolist())
        params = {**common["params"], "n_tokens": states.shape[1]}
        return [
            LayerScores("logit_lens_kl_nats", np.array(kl), None, analysis=self.name, params=params,
                        description="KL(logit lens at the input of layer l || final distribution), nats"),
            LayerScores("logit_lens_top5_overlap", np.array(overlap), None, analysis=self.name, params=params,
                        description="share of the final top-5 tokens in the logit lens top-5 at layer l's input"),
        ]

