"""Effect of skipping a layer on later layers and on the output (Csordás, Manning & Potts, 2025, "Do Language
Models Use Their Depth Efficiently?", arXiv 2505.13898).

For each skipped layer s, its output is replaced by its input (h_{s+1} := h_s) at positions
[1, t) — the first token is never skipped — and the change is measured at positions >= t:

  effect on layer l:  ||Δ_l − Δ'_l|| / max(||Δ_l||, 1e-6),   Δ_l = h_{l+1} − h_l
  effect on output:   ||p − p'||_2  (probability vectors)

`mode="future"` (the paper): t is drawn from range(8, T−4, 8) (seeded, `n_positions` of them), so
only the effect carried to later tokens through attention is measured. `mode="all"` (the paper's
`positions=[None]` variant, default): t = 1, every position but the first is skipped and measured.
The paper takes the max over positions and prompts (`skip_effect`, `skip_output_effect_max`);
the token means (`skip_effect_mean`, `skip_output_effect`) are steadier and rank layers.
Layers before s are replayed from the dense run, not recomputed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..surgery import Surgery
from ..capture import Hooks
from ..model import Model
from ..profiles import LayerScores
from ..numeric import wide
from ..replay import STATE_SITES, DenseRun, replaying
from ..analyzer import Scan, register
from ..errors import LensbenchError

MODES = ("all", "future")


class _SkipBefore(nn.Module):
    """Runs the block, then puts its input back at positions 1..stop-1 (the block is skipped there)."""

    def __init__(self, block: nn.Module, stop: int):
        super().__init__()
        self.block, self.stop = block, stop

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        out = self.block(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        y = y.clone()
        y[:, 1:self.stop] = x[:, 1:self.stop]
        return (y, *out[1:]) if isinstance(out, tuple) else y


@register
@dataclass
class SkipEffect(Scan):
    name: ClassVar[str] = "skip_effect"
    layer_by_layer: ClassVar[bool] = True
    sites: ClassVar[tuple[str, ...]] = STATE_SITES
    needs_lm_head: ClassVar[bool] = True

    mode: str = "all"
    n_positions: int = 4
    seed: int = 0

    def start(self, model: Model) -> None:

        if self.mode not in MODES:
            raise LensbenchError(f"skip_effect mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        L = model.n_layers
        self.model_ = model
        self.max_ = np.zeros((L, L))
        self.sum_ = np.zeros((L, L))
        self.out_max_ = np.zeros(L)
        self.out_sum_ = np.zeros(L)
        self.count_ = 0
        self.rng_ = random.Random(self.seed)
        self._dense_probs = (None, None, None)

    def steps_per_batch(self) -> int:
        """One per skipped layer and position (short batches may have fewer positions)."""
        return self.model_.n_layers * (1 if self.mode == "all" else self.n_positions)

    def _positions(self, T: int) -> list[tuple[int, int]]:
        """(skip before, measure from) pairs: positions [1, stop) are skipped, [start, T) measured."""
        if self.mode == "all":
            return [(T, 1)]
        ts = list(range(8, T - 4, 8))
        self.rng_.shuffle(ts)
        return [(t, t) for t in ts[:self.n_positions]]

    def items(self, batch) -> list:
        """[stop, start, skipped layer] per position pair with something to measure and per layer."""
        T = batch.input_ids.shape[1]
        return [[stop, start, s] for stop, start in self._positions(T) if self._measured(batch, start).any()
                for s in range(self.model_.n_layers)]

    @staticmethod
    def _measured(batch, start: int) -> torch.Tensor:
        measured = batch.content_mask.clone()
        measured[:, :start] = False
        return measured

    @torch.no_grad()
    def measure(self, dense: DenseRun, item: list) -> dict:
        stop, start, s = item
        L = self.model_.n_layers
        measured = self._measured(dense.batch, start)
        cached = self._dense_probs  # the dense side, once per batch and position (a cache, not state)
        if cached[0] is not dense or cached[1] != start:
            cached = self._dense_probs = (dense, start, self._probs(dense.post[-1][measured]))
        p = cached[2]
        pre, post = self._skipped_run(dense, s, stop)
        rel_max, rel_sum = [], []
        for layer in range(s, L):
            d = (dense.post[layer] - dense.pre[layer])[measured].float()
            changed = (post[layer] - pre[layer])[measured].float()
            rel = (d - changed).norm(dim=-1) / d.norm(dim=-1).clamp_min(1e-6)
            rel_max.append(float(rel.max()))
            rel_sum.append(float(rel.sum()))
        dist = (p - self._probs(post[L - 1][measured])).norm(dim=-1)
        return {"max": rel_max, "sum": rel_sum, "out_max": float(dist.max()), "out_sum": float(dist.sum())}

    def fold(self, item: list, result: dict) -> None:
        _, _, s = item
        for k, layer in enumerate(range(s, self.model_.n_layers)):
            self.max_[s, layer] = max(self.max_[s, layer], result["max"][k])
            self.sum_[s, layer] += result["sum"][k]
        self.out_max_[s] = max(self.out_max_[s], result["out_max"])
        self.out_sum_[s] += result["out_sum"]

    def end_batch(self, batch, items: list) -> None:
        for start in dict.fromkeys(start for _, start, _ in items):
            self.count_ += int(self._measured(batch, start).sum())

    def _probs(self, resid: torch.Tensor) -> torch.Tensor:
        ad = self.model_.adapter
        return torch.softmax(wide(ad.head(ad.final_normed(resid))), dim=-1)

    def _skipped_run(self, dense: DenseRun, s: int, stop: int) -> tuple[dict, dict]:
        """Block inputs and outputs of layers >= s with layer s skipped at positions [1, stop)."""
        ad = self.model_.adapter
        blocks = list(ad.blocks)
        pre, post = {}, {}
        surgery = Surgery()
        skip = _SkipBefore(blocks[s], stop)
        try:
            surgery.swap(ad.base, f"{ad.layers}.{s}", skip)
            with replaying(self.model_, {j: dense.post[j] for j in range(s)}), Hooks() as hooks:
                for layer, b in [(s, skip), *((j, blocks[j]) for j in range(s + 1, len(blocks)))]:
                    hooks.add_input(b, lambda x, i=layer: pre.__setitem__(i, x))
                    hooks.add_output(b, lambda x, i=layer: post.__setitem__(i, x))
                ad.base(**dense.batch.model_inputs(), use_cache=False)
        finally:
            surgery.restore()
        return pre, post

    def finish(self) -> list[LayerScores]:
        n = max(self.count_, 1)
        common = dict(analysis=self.name, params={**self.params(), "n_tokens": self.count_})
        axes = ("skipped_layer", "layer")
        return [
            LayerScores("skip_effect", self.max_, None, axes, description="max relative change of layer l's update "
                        "when layer s is skipped (row s, column l; Csordás et al.)", **common),
            LayerScores("skip_effect_mean", self.sum_ / n, None, axes,
                        description="mean relative change of layer l's update when layer s is skipped", **common),
            LayerScores("skip_output_effect", self.out_sum_ / n, True, description="mean L2 change of the output "
                        "probabilities when this layer is skipped", **common),
            LayerScores("skip_output_effect_max", self.out_max_, None, description="max L2 change of the output "
                        "probabilities when this layer is skipped (Csordás et al.)", **common),
        ]
