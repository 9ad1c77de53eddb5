"""Faithfulness of token attributions: deletion curves and ABPC (DynamicLRP, Lee & Arias, 2025, §4.3), with the
baselines Gradient×Input, Integrated Gradients and random.

Tokens are *masked*, not removed (positions stay put): step i replaces the i most relevant tokens
(MoRF) or the i least relevant (LeRF) with a neutral token (the tokenizer's pad/eos by default) and
records the probability of the target token at the last position. Special tokens are never masked.
The curves run from 0 to all content tokens masked, on a [0, 1] axis; AUC is by the trapezoid rule.

  ABPC = AUC(LeRF) − AUC(MoRF)         (higher: the ranking finds what the prediction rests on)
  comprehensiveness = p0 − AUC(MoRF),  sufficiency = p0 − AUC(LeRF)

All perturbed inputs of one prompt run as one batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lensbench.model import Model

from .registry import LRPError


@dataclass
class Curves:
    morf: np.ndarray
    lerf: np.ndarray
    p0: float

    @property
    def x(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, len(self.morf))

    def auc(self, y: np.ndarray) -> float:
        return float(np.trapezoid(y, self.x))

    @property
    def abpc(self) -> float:
        return self.auc(self.lerf) - self.auc(self.morf)

    def summary(self) -> dict:
        return {"abpc": self.abpc, "comprehensiveness": self.p0 - self.auc(self.morf),
                "sufficiency": self.p0 - self.auc(self.lerf), "p0": self.p0}


def mask_token(model: Model) -> int:
    tok = model.tokenizer
    for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if t is not None:
            return int(t)
    raise LRPError("the tokenizer has no pad, eos or unk token to mask with: pass mask_id=")


def _content(model: Model, ids: torch.Tensor) -> np.ndarray:
    special = set(model.tokenizer.all_special_ids)
    return np.array([i for i, t in enumerate(ids.tolist()) if t not in special])


@torch.no_grad()
def deletion_curves(model: Model, ids: torch.Tensor, scores: np.ndarray, target_id: int,
                    mask_id: int | None = None) -> Curves:
    """MoRF and LeRF curves for one prompt (`ids`: [S] token ids, `scores`: [S] relevance)."""
    mask_id = mask_token(model) if mask_id is None else mask_id
    pos = _content(model, ids)
    if len(pos) == 0:
        raise LRPError("the prompt has no content tokens to mask")
    order = pos[np.argsort(-scores[pos], kind="stable")]  # most relevant first
    rows = [ids.clone()]
    for ranking in (order, order[::-1]):
        for i in range(1, len(pos) + 1):
            r = ids.clone()
            r[torch.as_tensor(ranking[:i].copy())] = mask_id
            rows.append(r)
    logits = model.module(input_ids=torch.stack(rows)).logits[:, -1].float()
    p = torch.softmax(logits, -1)[:, target_id].numpy()
    n = len(pos)
    return Curves(morf=np.concatenate([[p[0]], p[1:n + 1]]), lerf=np.concatenate([[p[0]], p[n + 1:]]), p0=float(p[0]))


def _embed(model: Model, ids: torch.Tensor) -> torch.Tensor:
    return model.module.get_input_embeddings()(ids[None]).detach().float()


def _target_logit(model: Model, emb: torch.Tensor, target_id: int) -> torch.Tensor:
    return model.module(inputs_embeds=emb.to(next(model.module.parameters()).dtype)).logits[:, -1, target_id]


def gradient_x_input(model: Model, ids: torch.Tensor, target_id: int) -> np.ndarray:
    """Σ_d x ⊙ ∂logit/∂x over the input embeddings, per token."""
    emb = _embed(model, ids).requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(_target_logit(model, emb, target_id).sum(), emb)
    return (emb.detach() * g).sum(-1)[0].double().numpy()


def integrated_gradients(model: Model, ids: torch.Tensor, target_id: int, steps: int = 32, batch: int = 16,
                         mask_id: int | None = None) -> np.ndarray:
    """Integrated Gradients per token, from the baseline where every content token is the mask token
    (the same neutral input the deletion curves end at; an all-zero embedding sits on the singular point
    of the first RMS/LayerNorm). Trapezoid rule over `steps` intervals. Completeness: the scores sum
    to logit(x) − logit(baseline) up to the discretisation error."""
    mask_id = mask_token(model) if mask_id is None else mask_id
    base_ids = ids.clone()
    base_ids[torch.as_tensor(_content(model, ids))] = mask_id
    emb, base = _embed(model, ids), _embed(model, base_ids)
    alphas = torch.linspace(0.0, 1.0, steps + 1)
    weights = torch.full((steps + 1,), 1.0 / steps)
    weights[0] = weights[-1] = 0.5 / steps
    total = torch.zeros_like(emb)
    for start in range(0, steps + 1, batch):
        a = alphas[start:start + batch]
        path = (base + a[:, None, None] * (emb - base)).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(_target_logit(model, path, target_id).sum(), path)
        total += (g * weights[start:start + batch, None, None]).sum(0, keepdim=True)
    return ((emb - base) * total).sum(-1)[0].double().numpy()


def random_scores(ids: torch.Tensor, seed: int) -> np.ndarray:
    """Random relevance. Give each prompt its own seeds: one seed shared by prompts of the same length
    would rank the same positions first every time, a bias rather than a baseline."""
    return np.random.default_rng(seed).standard_normal(len(ids))
