"""Run a model with units removed, reusing the dense run's prefix, and score it against the dense model.

Removing a unit at layer i leaves layers < i exactly as they were, so their outputs are replayed
from the dense run instead of recomputed; a removed block at the first changed layer is a replay of
its input, a removed MLP a replay of the dense mid-block residual. Only the suffix runs. The model's
own forward still builds masks and position embeddings, so this stays architecture-agnostic.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapters import site_name
from .surgery import Surgery, apply_units
from .capture import CaptureSpec, capture_batch
from .model import Batch, Model
from .numeric import wide
from .offload import resident
from .units import Unit

STATE_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
SCORE_CHUNK = 256  # tokens per chunk when scoring against the vocabulary


class _Replay(nn.Module):
    """Stands in for a block whose output is already known."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@dataclass
class DenseRun:
    """The dense model's states and output distribution on one batch.

    With a linear LM head (logits = h W^T + b) the KL to a changed model needs no second
    vocabulary-sized pass: KL(p || q) = sum p log p - p.z + logsumexp(z), and p.z = h.(p W) + p.b,
    so `pW` and `pb` are kept per scored token and only logsumexp(z) touches the vocabulary.
    """

    batch: Batch
    pre: list[torch.Tensor]
    mid: list[torch.Tensor]
    post: list[torch.Tensor]
    mask: torch.Tensor  # [B, T] positions that are scored (real, non-special tokens)
    targets: torch.Tensor  # [N] next-token id at each scored position, -1 where the text ends
    neg_entropy: torch.Tensor  # [N] sum p log p of the dense distribution
    dense_nll: torch.Tensor  # [N] dense next-token loss (NaN where the text ends)
    pW: torch.Tensor | None  # [N, d] p @ W (linear heads)
    pb: torch.Tensor | None  # [N] p . b (linear heads with a bias)
    logp: torch.Tensor | None  # [N, V] dense log-probabilities (non-linear heads only)

    @classmethod
    def from_trace(cls, model: Model, trace) -> "DenseRun":
        batch = Batch(trace.input_ids, trace.attention_mask, trace.content_mask)
        dtype = next(model.module.parameters()).dtype
        L = model.n_layers

        def states(site):
            return [trace[site_name(i, site)].to(dtype) for i in range(L)]

        pre, mid, post = states("hook_resid_pre"), states("hook_resid_mid"), states("hook_resid_post")
        mask = batch.content_mask
        targets = batch.next_tokens()[mask]
        ad = model.adapter
        linear = ad.linear_head()
        negent, nll, pW, pb, keep = [], [], [], [], []
        with torch.no_grad(), resident(*ad.head_modules()):
            normed = ad.final_normed(post[-1][mask])
            for s in range(0, normed.shape[0], SCORE_CHUNK):
                logp = torch.log_softmax(wide(ad.head(normed[s:s + SCORE_CHUNK])), dim=-1)
                p = logp.exp()
                negent.append((p * logp).sum(-1))
                nll.append(_pick_nll(logp, targets[s:s + SCORE_CHUNK]))
                if linear is None:
                    keep.append(logp)
                else:
                    pW.append(p @ wide(linear[0]))
                    if linear[1] is not None:
                        pb.append(p @ wide(linear[1]))
        cat = torch.cat
        return cls(batch, pre, mid, post, mask, targets, cat(negent), cat(nll), cat(pW) if pW else None,
                   cat(pb) if pb else None, cat(keep) if keep else None)

    @classmethod
    def from_batch(cls, model: Model, batch: Batch) -> "DenseRun":
        trace, _ = capture_batch(model, CaptureSpec(sites=STATE_SITES).validate(model), batch)
        return cls.from_trace(model, trace)

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def _pick_nll(logq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    nll = -logq.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return torch.where(targets >= 0, nll, torch.nan)


@contextlib.contextmanager
def replaying(model: Model, outputs: dict[int, torch.Tensor]) -> Iterator[None]:
    """Blocks at the given positions of the current layer list return the given outputs."""
    surgery = Surgery()
    try:
        for j, out in outputs.items():
            surgery.swap(model.adapter.base, f"{model.adapter.layers}.{j}", _Replay(out))
        yield
    finally:
        surgery.restore()


@torch.no_grad()
def removed_states(model: Model, dense: DenseRun, units: Sequence[Unit]) -> torch.Tensor:
    """[N, d] final-normed states at the scored positions with `units` removed (units as `Plan.resolve`
    returns them: at most one unit per layer)."""
    units = sorted(units)
    first = units[0].layer if units else model.n_layers
    replay = {j: dense.post[j] for j in range(first)}
    rest = list(units)
    if units and units[0].kind in ("block", "mlp"):
        replay[first] = dense.pre[first] if units[0].kind == "block" else dense.mid[first]
        rest = rest[1:]
    with apply_units(model, rest), replaying(model, replay):
        out = model.adapter.base(**dense.batch.model_inputs(), use_cache=False)
    return out.last_hidden_state[dense.mask]


@torch.no_grad()
def states_from(model: Model, dense: DenseRun, first: int) -> torch.Tensor:
    """[N, d] final-normed states when layers before `first` are replayed from the dense run and the
    rest runs as the model now is (e.g. with layer `first` onwards changed in place)."""
    with replaying(model, {j: dense.post[j] for j in range(first)}):
        out = model.adapter.base(**dense.batch.model_inputs(), use_cache=False)
    return out.last_hidden_state[dense.mask]


@torch.no_grad()
def token_scores(model: Model, dense: DenseRun, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token: KL(p_dense || q) and the next-token loss under q (NaN where the text ends),
    for the changed model's final-normed states. Chunked so vocabulary-sized temporaries stay small."""
    ad = model.adapter
    linear = ad.linear_head()
    kls, nlls = [], []
    with resident(*ad.head_modules()):
        for s in range(0, normed.shape[0], SCORE_CHUNK):
            kl, nll = _chunk_scores(ad, linear, dense, normed, s)
            kls.append(kl)
            nlls.append(nll)
    return torch.cat(kls), torch.cat(nlls)


def _chunk_scores(ad, linear, dense: DenseRun, normed: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL and next-token loss of the scored tokens s … s + SCORE_CHUNK."""
    h, tgt = normed[s:s + SCORE_CHUNK], dense.targets[s:s + SCORE_CHUNK]
    z = wide(ad.head(h))
    if linear is None:
        logq = torch.log_softmax(z, dim=-1)
        logp = dense.logp[s:s + SCORE_CHUNK]
        return (logp.exp() * (logp - logq)).sum(-1), _pick_nll(logq, tgt)
    lse = torch.logsumexp(z, dim=-1)
    pz = (wide(h) * dense.pW[s:s + SCORE_CHUNK]).sum(-1)
    if dense.pb is not None:
        pz = pz + dense.pb[s:s + SCORE_CHUNK]
    z_t = z.gather(1, tgt.clamp(min=0)[:, None])[:, 0]
    return dense.neg_entropy[s:s + SCORE_CHUNK] - pz + lse, torch.where(tgt >= 0, lse - z_t, torch.nan)


def removal_scores(model: Model, dense: DenseRun, units: Sequence[Unit]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token, KL to the dense model and next-token loss with `units` removed (dense prefix replayed)."""
    return token_scores(model, dense, removed_states(model, dense, units))


def change_scores(model: Model, dense: DenseRun, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token, KL to the dense model and next-token loss of the model as it is now (changed in place
    from layer `first` on; the layers before are replayed from the dense run)."""
    return token_scores(model, dense, states_from(model, dense, first))
