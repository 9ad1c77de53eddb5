"""SVD communication channels between attention heads (Talking Heads; METHODS.md §2).

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
    null_mean, null_std: [L, H]     per reader, CS of random rank-1 writers (unit directions)
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
        thresh = self.null_mean + z * self.null_std  # [L, H] per reader
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


@torch.no_grad()
def composition(circ: HeadCircuits, mode: str = "Q", null_samples: int = 256, seed: int = 0,
                ov: Factored | None = None) -> Composition:
    """Full and per-component composition scores of `mode` for all head pairs (see module docstring)."""
    ov = ov or circ.ov()
    reader = _reader(circ, ov, mode)
    L, H = circ.n_layers, circ.n_heads
    r, d = ov.Vt.shape[-2], ov.Vt.shape[-1]
    P = reader.U * reader.S[..., None, :] / reader.S.norm(dim=-1)[..., None, None]  # P T / ||T||: [L, H, d, r]
    comp = torch.zeros(L, H, r, L, H, dtype=torch.float64)
    for lw in range(L - 1):  # one GEMM per writer layer against all later reader layers
        rows = ov.Vt[lw].reshape(H * r, d)  # [H*r, d]
        cols = P[lw + 1:].permute(2, 0, 1, 3).reshape(d, -1)  # [d, (L-lw-1)*H*r]
        c = (rows @ cols).reshape(H, r, L - lw - 1, H, r)
        comp[lw, :, :, lw + 1:] = c.square().sum(-1).sqrt().double()
    S = ov.S.double()  # [L, H, r]
    w = (S / S.norm(dim=-1, keepdim=True)).square()  # CS^2 = sum_i (sigma_i^2 / ||S||^2) CS_i^2
    scores = torch.einsum("whi,whilk->whlk", w, comp.square()).sqrt()
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(null_samples, d, generator=gen, dtype=P.dtype)
    v = v / v.norm(dim=-1, keepdim=True)
    null = (v @ P.permute(2, 0, 1, 3).reshape(d, -1)).reshape(null_samples, L, H, r).square().sum(-1).sqrt()
    return Composition(mode, scores.numpy(), comp.numpy(), ov.S.double().numpy(),
                       null.mean(0).double().numpy(), null.std(0).double().numpy())


def all_compositions(model: Model, modes=MODES, **kwargs) -> dict[str, Composition]:
    circ = head_circuits(model)
    ov = circ.ov()
    return {m: composition(circ, m, ov=ov, **kwargs) for m in modes}
