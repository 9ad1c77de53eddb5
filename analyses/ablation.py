"""Ablation sensitivity: what removing each block, attention sublayer or MLP sublayer alone does to the output.

For every unit u, on the calibration text: KL(p_dense || p_without_u) averaged over scored tokens (the
fitness of EvoPress: Sieberling et al., 2024, arXiv 2410.14649) and the change of next-token loss. Higher = more
important.

The scan reuses the dense prefix (`lensbench.replay`): removing a unit at layer i leaves layers < i
unchanged, so only the suffix is computed; `naive_scan` is the plain one-forward-per-unit twin it is
tested and benchmarked against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from ..surgery import apply_units
from ..model import Batch, Model
from ..units import Unit
from ..numeric import wide
from ..profiles import LayerScores
from ..replay import STATE_SITES, removal_scores
from ..analyzer import Scan, register

KIND_WORDS = {"block": "block", "attn": "attention sublayer", "mlp": "MLP sublayer"}


def units_for(model: Model, kinds: Sequence[str]) -> list[Unit]:
    kinds = [k for k in kinds if k == "block" or model.adapter.sublayer_drop]
    return [Unit(i, k) for k in kinds for i in range(model.n_layers)]


@register
@dataclass
class Ablation(Scan):
    name: ClassVar[str] = "ablation"
    layer_by_layer: ClassVar[bool] = True
    sites: ClassVar[tuple[str, ...]] = STATE_SITES
    needs_lm_head: ClassVar[bool] = True

    kinds: tuple[str, ...] = ("block", "attn", "mlp")

    def start(self, model: Model) -> None:
        self.model_ = model
        self.units_ = units_for(model, self.kinds)
        self.kl_ = np.zeros(len(self.units_))
        self.dloss_ = np.zeros(len(self.units_))
        self.n_kl_ = 0
        self.n_loss_ = 0

    def items(self, batch) -> list:
        return list(range(len(self.units_)))

    def measure(self, dense, j: int) -> dict:
        kl, nll = removal_scores(self.model_, dense, [self.units_[j]])
        has_next = ~torch.isnan(dense.dense_nll)
        return {"kl": float(kl.sum()), "dloss": float((nll - dense.dense_nll)[has_next].sum())}

    def fold(self, j: int, result: dict) -> None:
        self.kl_[j] += result["kl"]
        self.dloss_[j] += result["dloss"]

    def end_batch(self, batch, items: list) -> None:
        self.n_kl_ += int(batch.content_mask.sum())
        self.n_loss_ += int((batch.next_tokens()[batch.content_mask] >= 0).sum())

    def steps_per_batch(self) -> int:
        return len(self.units_)

    def finish(self) -> list[LayerScores]:
        out = []
        for kind in dict.fromkeys(u.kind for u in self.units_):
            idx = [j for j, u in enumerate(self.units_) if u.kind == kind]
            what = KIND_WORDS[kind]
            out.append(LayerScores(f"ablation_kl_{kind}", self.kl_[idx] / max(self.n_kl_, 1), True, ("layer",),
                                   self.name, f"KL(dense || model without this {what}), nats per token", self.params()))
            out.append(LayerScores(f"ablation_dloss_{kind}", self.dloss_[idx] / max(self.n_loss_, 1), True,
                                   ("layer",), self.name, f"increase of next-token loss without this {what}, nats",
                                   self.params()))
        return out


@torch.no_grad()
def naive_scan(model: Model, batch: Batch, units: Sequence[Unit]) -> np.ndarray:
    """Mean KL per unit, one full forward of the model per removed unit (the reference twin)."""
    inputs = batch.model_inputs()
    logp = torch.log_softmax(wide(model.module(**inputs).logits[batch.content_mask]), -1)
    p = logp.exp()
    out = []
    for unit in units:
        with apply_units(model, [unit]):
            logq = torch.log_softmax(wide(model.module(**inputs).logits[batch.content_mask]), -1)
        out.append(float((p * (logp - logq)).sum(-1).mean()))
    return np.array(out)
