"""Geometry of layer updates (Yoo, 2026, "On the Geometric Structure of Layer Updates in Deep Language Models",
arXiv 2604.02459): how much of each layer's update Δ = h' − h a tokenwise map T(x) = A(x)·x explains, and
whether what it misses predicts the layer's effect on the output.

For every sampled token x_i, A_i is fitted by least squares on its k nearest neighbours (cosine on
mean-centred states, the token itself left out) among a reservoir of calibration tokens:

* `cls="diagonal"`: A = diag(a), a_d = Σ_j x_jd Δ_jd / Σ_j x_jd²;
* `cls="lowrank"` (default): reduced-rank ridge regression of rank `rank` — the ridge fit, written
  with the neighbours' Gram matrix (k << d), then projected on the top right-singular directions of
  its fitted values.

Per layer: alignment cos(Δ, T) and cos(Δ, r) with r = Δ − T, their angles, energies ||T||²/||Δ||²
and ||r||²/||Δ||², the share of T and of r inside the top-`top_p` principal directions of the T's,
and the approximation error e = ||r||/||Δ||. The functional link: each layer's update is replaced
by its tokenwise approximation on one calibration batch (h' := h + T(h), prefix replayed), the KL
to the dense output measured, and Spearman ρ(e, KL) across layers reported (paper: often > 0.7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import LensbenchError
from ..model import Model
from ..profiles import LayerScores, Table
from ..replay import STATE_SITES, DenseRun, replaying, token_scores
from ..stats import spearman
from ..analyzer import Analyzer, register

CLASSES = ("lowrank", "diagonal")
_CHUNK = 256


@register
@dataclass
class Geometry(Analyzer):
    name: ClassVar[str] = "geometry"
    layer_by_layer: ClassVar[bool] = True
    sites: ClassVar[tuple[str, ...]] = STATE_SITES
    needs_lm_head: ClassVar[bool] = True

    cls: str = "lowrank"
    rank: int = 4
    k: int = 32
    tokens: int = 1024
    top_p: int = 16
    ridge: float = 1e-3
    seed: int = 0

    def start(self, model: Model) -> None:
        if self.cls not in CLASSES:
            raise LensbenchError(f"geometry class must be one of {', '.join(CLASSES)}, not {self.cls!r}")
        if self.k < 2 or (self.cls == "lowrank" and self.rank >= self.k):
            raise LensbenchError(f"geometry needs k >= 2 neighbours and rank < k (got k={self.k}, rank={self.rank})")
        self.model_ = model
        L, d = model.n_layers, model.d_model
        self.keys_ = torch.empty(0)
        self.x_ = torch.empty(L, 0, d)
        self.delta_ = torch.empty(L, 0, d)
        self.dense_: DenseRun | None = None
        self.gen_ = torch.Generator().manual_seed(self.seed)

    def update(self, trace) -> None:
        dense = DenseRun.from_trace(self.model_, trace)
        if self.dense_ is None:
            self.dense_ = dense  # the batch the functional link is measured on
        mask = dense.mask.clone()
        mask[:, 0] = False  # the first position's massive norm is not a typical token
        keys = torch.rand(int(mask.sum()), generator=self.gen_)
        all_keys = torch.cat([self.keys_, keys])
        keep = all_keys.argsort(descending=True)[:self.tokens]
        x = torch.stack([p[mask].float() for p in dense.pre])
        delta = torch.stack([(q - p)[mask].float() for p, q in zip(dense.pre, dense.post, strict=True)])
        self.x_ = torch.cat([self.x_, x], 1)[:, keep]
        self.delta_ = torch.cat([self.delta_, delta], 1)[:, keep]
        self.keys_ = all_keys[keep]

    # --- the tokenwise fit ----------------------------------------------------------------------------
    def _neighbours(self, bank: torch.Tensor, queries: torch.Tensor, exclude_self: bool) -> torch.Tensor:
        mean = bank.mean(0)
        b = torch.nn.functional.normalize(bank - mean, dim=-1)
        q = torch.nn.functional.normalize(queries - mean, dim=-1)
        out = []
        for s in range(0, q.shape[0], _CHUNK):
            sim = q[s:s + _CHUNK] @ b.T
            if exclude_self:  # leave-one-out: the query's own entry in the bank
                sim[sim > 1 - 1e-6] = -math.inf
            out.append(sim.topk(min(self.k, bank.shape[0] - 1), dim=-1).indices)
        return torch.cat(out)

    def _fit(self, x: torch.Tensor, delta: torch.Tensor, queries: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """T(q) for each query from its neighbours idx [M, k] in the bank (x, delta)."""
        out = []
        for s in range(0, queries.shape[0], _CHUNK):
            q, nb = queries[s:s + _CHUNK].double(), idx[s:s + _CHUNK]
            X, D = x[nb].double(), delta[nb].double()  # [m, k, d]
            if self.cls == "diagonal":
                a = (X * D).sum(1) / (X * X).sum(1).clamp_min(1e-12)
                out.append((a * q).float())
                continue
            K = X @ X.transpose(1, 2)  # [m, k, k]
            lam = self.ridge * K.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
            alpha = torch.linalg.solve(K + lam[:, None, None] * torch.eye(K.shape[-1], dtype=K.dtype), D)
            full = torch.einsum("mk,mkd->md", torch.einsum("mkd,md->mk", X, q), alpha)
            vh = torch.linalg.svd(K @ alpha, full_matrices=False).Vh[:, :self.rank]  # [m, r, d]
            out.append(torch.einsum("mr,mrd->md", torch.einsum("md,mrd->mr", full, vh), vh).float())
        return torch.cat(out)

    @torch.no_grad()
    def finish(self) -> list:
        model = self.model_
        L = model.n_layers
        names = ("cos_tokenwise", "cos_residual", "angle_tokenwise", "angle_residual", "energy_tokenwise",
                 "energy_residual", "proj_tokenwise", "proj_residual", "error", "replacement_kl")
        m = {n: np.full(L, np.nan) for n in names}
        for layer in range(L):
            x, delta = self.x_[layer], self.delta_[layer]
            if x.shape[0] <= self.k:
                raise LensbenchError(f"geometry needs more than k={self.k} tokens; give more text or a smaller k")
            T = self._fit(x, delta, x, self._neighbours(x, x, exclude_self=True))
            r = delta - T
            dn = delta.norm(dim=-1).clamp_min(1e-12)
            cos_t = (delta * T).sum(-1) / (dn * T.norm(dim=-1).clamp_min(1e-12))
            cos_r = (delta * r).sum(-1) / (dn * r.norm(dim=-1).clamp_min(1e-12))
            u = torch.linalg.svd(T.double(), full_matrices=False).Vh[:self.top_p].float()
            m["cos_tokenwise"][layer], m["cos_residual"][layer] = float(cos_t.mean()), float(cos_r.mean())
            m["angle_tokenwise"][layer] = float(torch.rad2deg(torch.arccos(cos_t.clamp(-1, 1))).mean())
            m["angle_residual"][layer] = float(torch.rad2deg(torch.arccos(cos_r.clamp(-1, 1))).mean())
            total = float((dn ** 2).sum())
            m["energy_tokenwise"][layer] = float((T.norm(dim=-1) ** 2).sum()) / total
            m["energy_residual"][layer] = float((r.norm(dim=-1) ** 2).sum()) / total
            m["proj_tokenwise"][layer], m["proj_residual"][layer] = _share(T, u), _share(r, u)
            m["error"][layer] = float((r.norm(dim=-1) / dn).mean())
            m["replacement_kl"][layer] = self._replacement_kl(layer)
        params = {**self.params(), "n_tokens": int(self.x_.shape[1])}
        desc = {"cos_tokenwise": "mean cos(update, tokenwise fit T)", "cos_residual": "mean cos(update, residual r)",
                "angle_tokenwise": "mean angle between update and T, degrees",
                "angle_residual": "mean angle between update and r, degrees",
                "energy_tokenwise": "||T||^2 / ||update||^2", "energy_residual": "||r||^2 / ||update||^2",
                "proj_tokenwise": f"share of T inside the top-{self.top_p} principal directions of T",
                "proj_residual": f"share of r inside the top-{self.top_p} principal directions of T",
                "error": "tokenwise approximation error ||r|| / ||update||",
                "replacement_kl": "KL(dense || model with this layer's update replaced by its tokenwise fit)"}
        ranked = {"error": True, "replacement_kl": True}
        out = [LayerScores(f"geometry_{n}", m[n], ranked.get(n), analysis=self.name, description=desc[n],
                           params=params) for n in names]
        rho = spearman(m["error"], m["replacement_kl"])
        out.append(Table("geometry_summary", [{"class": self.cls, "rank": self.rank if self.cls == "lowrank" else None,
                                               "k": self.k, "spearman_error_vs_replacement_kl": rho}],
                         analysis=self.name, params=params,
                         description="Spearman correlation across layers of the tokenwise approximation error with "
                                     "the output change when the update is replaced by its tokenwise fit"))
        return out

    def _replacement_kl(self, layer: int) -> float:
        """KL to the dense output on the kept batch with this layer's update replaced by its tokenwise fit."""
        dense, model = self.dense_, self.model_
        mask = dense.mask.clone()
        mask[:, 0] = False
        x, delta = self.x_[layer], self.delta_[layer]
        q = dense.pre[layer][mask].float()
        T = self._fit(x, delta, q, self._neighbours(x, q, exclude_self=True))
        new = dense.post[layer].clone()
        new[mask] = (q + T).to(new.dtype)
        replay = {j: dense.post[j] for j in range(layer)} | {layer: new}
        with replaying(model, replay):
            out = model.adapter.base(**dense.batch.model_inputs(), use_cache=False)
        kl, _ = token_scores(model, dense, out.last_hidden_state[dense.mask])
        return float(kl.mean())


def _share(v: torch.Tensor, basis: torch.Tensor) -> float:
    """Mean fraction of each row's norm inside the span of `basis` (orthonormal rows)."""
    return float(((v @ basis.T).norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-12)).mean())
