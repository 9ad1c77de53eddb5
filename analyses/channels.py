"""SVD communication channels between attention heads (Talking Heads: Merullo, Eickhoff & Pavlick, 2024, arXiv
2406.09519).

Per head, in TransformerLens's row-vector convention and with each head's input norm folded in
(LayerNorm: its weight folded and reading/writing weights centred, as TransformerLens's
`fold_ln` + `center_writing_weights`; RMSNorm: its weight folded):

    W_OV = W_V W_O  (writer)        W_QK = W_Q W_K^T  (reader)        both rank <= d_head

Every circuit is kept as a thin SVD `U diag(S) Vt` computed from its factors (a d_model x d_head QR
and a d_head x d_model SVD), never as a d_model x d_model product. Then, for a writer with
`W_OV = U S Vt` and a reader circuit `R = P T Qt` (Q: W_QK, K: W_QK^T, V: the reader's W_OV),

    composition  CS = ||S (Vt P) T||_F / (||S|| ||T||)                         (TransformerLens's score)
    component i  CS_i = ||(Vt P)_i T|| / ||T||   = CS(sigma_i u_i v_i^T, R)    (the paper's decomposition)

so one GEMM of all writers' `Vt` against all readers' `P` gives both the full and the decomposed
scores, for reader layers after the writer's layer only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LensbenchError
from ..model import Model
from ..profiles import LayerScores, Table
from ..analyzer import Analyzer, register

MODES = ("Q", "K", "V")


@dataclass
class Factored:
    """A batch of rank-r matrices `U diag(S) Vt`: U [..., d, r], S [..., r], Vt [..., r, d]."""

    U: torch.Tensor
    S: torch.Tensor
    Vt: torch.Tensor

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor) -> "Factored":
        """Thin SVD of A @ B for A [..., d, r], B [..., r, d] without forming the d x d product."""
        q, r = torch.linalg.qr(A)  # A = q r, q orthonormal [d, r]
        u, s, vt = torch.linalg.svd(r @ B, full_matrices=False)  # [r, d] matrix
        return cls(q @ u, s, vt)

    def transpose(self) -> "Factored":
        return Factored(self.Vt.transpose(-1, -2), self.S, self.U.transpose(-1, -2))

    def dense(self) -> torch.Tensor:
        return (self.U * self.S[..., None, :]) @ self.Vt


@dataclass
class HeadCircuits:
    """Folded per-head weights of every layer, keys/values expanded to query heads (GQA)."""

    W_Q: torch.Tensor  # [L, H, d, dh]
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor  # [L, H, dh, d]

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    def ov(self) -> Factored:
        return Factored.from_factors(self.W_V, self.W_O)

    def qk(self) -> Factored:
        return Factored.from_factors(self.W_Q, self.W_K.transpose(-1, -2))


def head_circuits(model: Model, fold_norms: bool = True, dtype: torch.dtype = torch.float32) -> HeadCircuits:
    """Per-head W_Q, W_K, W_V, W_O of all layers with the input norm folded in (see module docstring)."""
    adapter = model.adapter
    try:
        weights = [adapter.head_weights(i).expand_kv() for i in range(model.n_layers)]
    except NotImplementedError:
        raise LensbenchError(f"{type(model.module).__name__} ({adapter.family}) exposes no per-head attention "
                             f"weights, so its attention cannot be decomposed into heads") from None
    stack = {k: torch.stack([getattr(w, k) for w in weights]).to(dtype) for k in ("W_Q", "W_K", "W_V", "W_O")}
    if fold_norms and adapter.ln1:
        norms = [adapter.blocks[i].get_submodule(adapter.ln1) for i in range(model.n_layers)]
        gain = torch.stack([_norm_gain(n) for n in norms]).to(dtype)  # [L, d]
        for k in ("W_Q", "W_K", "W_V"):
            stack[k] = stack[k] * gain[:, None, :, None]
        if isinstance(norms[0], torch.nn.LayerNorm):  # LayerNorm removes the mean: centre what reads and writes
            for k in ("W_Q", "W_K", "W_V"):
                stack[k] = stack[k] - stack[k].mean(2, keepdim=True)
            stack["W_O"] = stack["W_O"] - stack["W_O"].mean(-1, keepdim=True)
    return HeadCircuits(**stack)


def _norm_gain(norm: torch.nn.Module) -> torch.Tensor:
    """The per-feature gain a norm applies (Gemma's RMSNorm stores weight - 1)."""
    w = norm.weight.detach()
    return w + 1 if type(norm).__name__.startswith("Gemma") else w


@dataclass
class Composition:
    """Composition scores of one mode between every writer head and every later reader head.

    scores:     [L, H, L, H]        CS(W_OV[writer], R[reader]); 0 where reader layer <= writer layer
    components: [L, H, dh, L, H]    CS of each writer singular component (sorted by singular value)
    null_mean, null_std: [L, H]     per reader, the null distribution of component scores (see composition)
    """

    mode: str
    scores: np.ndarray
    components: np.ndarray
    writer_singular_values: np.ndarray  # [L, H, dh]
    null_mean: np.ndarray
    null_std: np.ndarray

    def channels(self, z: float = 3.0) -> "list[dict]":
        """Writer components whose score exceeds the reader's null mean by `z` null standard deviations."""
        L, H, r = self.components.shape[:3]
        thresh = np.nan_to_num(self.null_mean + z * self.null_std, nan=np.inf)  # [L, H] per reader
        later = np.triu(np.ones((L, L), dtype=bool), 1)[:, None, None, :, None]
        hits = np.argwhere((self.components > thresh[None, None, None]) & later)
        out = []
        for lw, hw, i, lr, hr in hits:
            score = float(self.components[lw, hw, i, lr, hr])
            out.append({"mode": self.mode, "writer": (int(lw), int(hw)), "component": int(i),
                        "reader": (int(lr), int(hr)), "score": score,
                        "z": float((score - self.null_mean[lr, hr]) / self.null_std[lr, hr]),
                        "sigma": float(self.writer_singular_values[lw, hw, i])})
        return sorted(out, key=lambda e: -e["z"])


def _reader(circ: HeadCircuits, ov: Factored, mode: str) -> Factored:
    if mode == "Q":
        return circ.qk()
    if mode == "K":
        return circ.qk().transpose()
    if mode == "V":
        return ov
    raise LensbenchError(f"unknown composition mode {mode!r}: use one of {', '.join(MODES)}")


NULLS = ("noncausal", "random")


@torch.no_grad()
def composition(circ: HeadCircuits, mode: str = "Q", null: str = "noncausal", null_samples: int = 256,
                seed: int = 0, ov: Factored | None = None) -> Composition:
    """Full and per-component composition scores of `mode` for all head pairs (see module docstring).

    The null distribution per reader head is, with null="noncausal", the component scores of the
    writers in the same or later layers (which cannot feed that reader: real weights, so the null
    carries their anisotropy); with null="random", scores of `null_samples` uniformly random write
    directions. The noncausal null is undefined for the first layer's readers (no writer feeds them).
    """
    if null not in NULLS:
        raise LensbenchError(f"unknown null {null!r}: use one of {', '.join(NULLS)}")
    ov = ov or circ.ov()
    reader = _reader(circ, ov, mode)
    L, H = circ.n_layers, circ.n_heads
    r, d = ov.Vt.shape[-2], ov.Vt.shape[-1]
    P = reader.U * reader.S[..., None, :] / reader.S.norm(dim=-1)[..., None, None]  # P T / ||T||: [L, H, d, r]
    comp = torch.zeros(L, H, r, L, H, dtype=torch.float64)
    first_reader = 0 if null == "noncausal" else None
    for lw in range(L):  # one GEMM per writer layer against the reader layers it needs
        lo = lw + 1 if first_reader is None else first_reader
        if lo >= L:
            continue
        rows = ov.Vt[lw].reshape(H * r, d)  # [H*r, d]
        cols = P[lo:].permute(2, 0, 1, 3).reshape(d, -1)  # [d, (L-lo)*H*r]
        comp[lw, :, :, lo:] = (rows @ cols).reshape(H, r, L - lo, H, r).square().sum(-1).sqrt().double()
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)[:, None, None, :, None]  # reader layer > writer
    if null == "noncausal":
        null_mean = torch.full((L, H), float("nan"), dtype=torch.float64)
        null_std = null_mean.clone()
        for lr in range(1, L):
            pool = comp[lr:, :, :, lr].reshape(-1, H)  # writers at layers >= lr against readers in lr
            null_mean[lr], null_std[lr] = pool.mean(0), pool.std(0)
    else:
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(null_samples, d, generator=gen, dtype=P.dtype)
        v = v / v.norm(dim=-1, keepdim=True)
        sample = (v @ P.permute(2, 0, 1, 3).reshape(d, -1)).reshape(null_samples, L, H, r).square().sum(-1).sqrt()
        null_mean, null_std = sample.mean(0).double(), sample.std(0).double()
    comp = comp * causal
    S = ov.S.double()  # [L, H, r]
    w = (S / S.norm(dim=-1, keepdim=True)).square()  # CS^2 = sum_i (sigma_i^2 / ||S||^2) CS_i^2
    scores = torch.einsum("whi,whilk->whlk", w, comp.square()).sqrt()
    return Composition(mode, scores.numpy(), comp.numpy(), ov.S.double().numpy(), null_mean.numpy(),
                       null_std.numpy())


def all_compositions(model: Model, modes=MODES, **kwargs) -> dict[str, Composition]:
    circ = head_circuits(model)
    ov = circ.ov()
    return {m: composition(circ, m, ov=ov, **kwargs) for m in modes}


def distinct_channels(edges, k: int) -> list[tuple[tuple[int, int], int, tuple[int, int]]]:
    """The first `k` distinct (writer, component, reader) triples of an edge list sorted by strength
    (the same component often composes in several modes)."""
    seen: list = []
    for e in edges:
        key = (tuple(int(x) for x in e["writer"]), int(e["component"]), tuple(int(x) for x in e["reader"]))
        if key not in seen:
            seen.append(key)
        if len(seen) == k:
            break
    return seen


class ChannelGraph:
    """Heads as nodes, significant writer components as edges (from a Profile's `channels` table)."""

    def __init__(self, edges: list[dict], n_layers: int, n_heads: int):
        self.edges, self.n_layers, self.n_heads = edges, n_layers, n_heads

    @classmethod
    def from_profile(cls, profile) -> "ChannelGraph":
        table = profile.tables.get("channels")
        if table is None:
            raise LensbenchError("this profile has no channel graph: run lensbench channels MODEL --out DIR")
        return cls(table.rows, int(profile.model["n_layers"]), int(table.params["n_heads"]))

    def to_frame(self):
        import pandas as pd  # heavy: pandas, only for tables

        return pd.DataFrame(self.edges)

    def plot(self, top: int = 200):
        """Interactive figure: heads on a layer x head grid, the `top` strongest edges by z."""
        import plotly.graph_objects as go  # heavy: plotly, only for figures

        fig = go.Figure()
        colours = {"Q": "#1f77b4", "K": "#2ca02c", "V": "#d62728"}
        for mode in MODES:
            xs, ys, text = [], [], []
            for e in [e for e in self.edges[:top] if e["mode"] == mode]:
                (lw, hw), (lr, hr) = e["writer"], e["reader"]
                xs += [lw, lr, None]
                ys += [hw, hr, None]
                text.append(f"{lw}.{hw} c{e['component']} -> {lr}.{hr} ({mode}, z={e['z']:.1f})")
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{mode}-composition",
                                     line={"color": colours[mode], "width": 1}, hoverinfo="skip"))
        grid = [(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]
        fig.add_trace(go.Scatter(x=[g[0] for g in grid], y=[g[1] for g in grid], mode="markers", name="heads",
                                 marker={"size": 6, "color": "#555"}, text=[f"head {a}.{b}" for a, b in grid],
                                 hoverinfo="text"))
        shown = min(top, len(self.edges))
        fig.update_layout(title=f"SVD communication channels: the {shown} strongest writer-component → reader edges "
                                "by z (colour: composition mode)", xaxis_title="layer", yaxis_title="head")
        return fig

    def __repr__(self) -> str:
        return f"ChannelGraph({len(self.edges)} edges over {self.n_layers} layers x {self.n_heads} heads)"


@register
@dataclass
class Channels(Analyzer):
    """Weight-only: composition scores of every head pair and the channel graph (no forward pass)."""

    name = "channels"
    sites = ()

    z: float = 3.0
    null: str = "noncausal"
    null_samples: int = 256
    max_edges: int = 2000
    seed: int = 0

    def start(self, model: Model) -> None:
        self.model_ = model

    def update(self, trace) -> None:  # weight-only: nothing to fold in
        return None

    def finish(self) -> list:
        comps = all_compositions(self.model_, null=self.null, null_samples=self.null_samples, seed=self.seed)
        axes = ("writer_layer", "writer_head", "reader_layer", "reader_head")
        out: list = [LayerScores(f"composition_{m.lower()}", c.scores, None, axes=axes, analysis=self.name,
                                 params=self.params(), description=f"{m}-composition score, writer -> later reader")
                     for m, c in comps.items()]
        spectra = next(iter(comps.values())).writer_singular_values  # W_OV's, the same for every mode
        out.append(LayerScores("ov_singular_values", spectra, None, axes=("layer", "head", "component"),
                               analysis=self.name, params=self.params(),
                               description="singular values of each head's W_OV (input norm folded in), descending"))
        edges = sorted((e for c in comps.values() for e in c.channels(self.z)), key=lambda e: -e["z"])
        out.append(Table("channels", edges[: self.max_edges], analysis=self.name,
                         description=f"writer singular components above the {self.null} null by z > {self.z}",
                         params={**self.params(), "n_edges_found": len(edges), "n_heads": self.model_.adapter.n_heads}))
        return out
