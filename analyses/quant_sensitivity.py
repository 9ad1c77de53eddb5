"""Quantisation sensitivity (Layer-Wise Quantization, arXiv 2406.17415; EvoPress, arXiv 2410.14649;
Schaefer et al., 2023, arXiv 2306.04879): how much quantising one unit alone moves the output.

* `quant_sensitivity` — for every block, and with `per_linear=True` every linear layer of every block, and every
  bit-width: KL(p_dense || p_quantised) per token on calibration text when only that unit's weights
  are quantised (round-to-nearest, group-wise, the packed format of `gpu/quant.py`). Layers before
  the unit are replayed from the dense run, so each measurement runs only the suffix. Scores are
  `quant_kl_block_int{b}` [L] and `quant_kl_linear_int{b}` [L, linears]; higher = more important.
* `weight_outliers` — the ZD score of LayerwiseQuant (§7), data-free: for each linear weight W,
  z = (W - mean W) / std W and zd(W) = fraction of entries with |z| > 1; ZD(layer) = mean over the
  block's linear weights. Lower ZD = more important (the paper's "smaller is better"), so the score
  is stored with `higher_is_more_important=False`. LIM is the redundancy analyzer's block cosine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..gpu.quant import check_spec
from ..model import Model
from ..profiles import LayerScores
from ..replay import STATE_SITES, DenseRun, change_scores
from ..simquant import block_linears, linear_inputs, linear_params, simulated
from ..analyzer import Analyzer, Scan, register


@register
@dataclass
class QuantSensitivity(Scan):
    name: ClassVar[str] = "quant_sensitivity"
    sites: ClassVar[tuple[str, ...]] = STATE_SITES
    needs_lm_head: ClassVar[bool] = True

    bits: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 128
    per_linear: bool = False  # 1 + (linears per block) times the forwards; enable for per-linear allocation

    def start(self, model: Model) -> None:
        for b in self.bits:
            check_spec(b, self.group_size)
        self.model_ = model
        self.linears_ = block_linears(model)
        L, B = model.n_layers, len(self.bits)
        self.kl_block_ = np.zeros((B, L))
        self.kl_linear_ = np.zeros((B, L, len(self.linears_)))
        self.n_ = 0

    def _kl(self, dense: DenseRun, layer: int, names: list[str], bits: int) -> float:
        block = self.model_.adapter.block_path(layer)
        with simulated(self.model_, {f"{block}.{n}": (bits, self.group_size) for n in names}):
            kl, _ = change_scores(self.model_, dense, layer)
        return float(kl.sum())

    def items(self, batch) -> list:
        return [[bi, i] for bi in range(len(self.bits)) for i in range(self.model_.n_layers)]

    def measure(self, dense: DenseRun, item: list) -> dict:
        bi, i = item
        b = self.bits[bi]
        linear = [self._kl(dense, i, [name], b) for name in self.linears_] if self.per_linear else []
        return {"block": self._kl(dense, i, self.linears_, b), "linear": linear}

    def fold(self, item: list, result: dict) -> None:
        bi, i = item
        self.kl_block_[bi, i] += result["block"]
        if self.per_linear:
            self.kl_linear_[bi, i] += np.asarray(result["linear"])

    def end_batch(self, batch, items: list) -> None:
        self.n_ += int(batch.content_mask.sum())

    def steps_per_batch(self) -> int:
        return len(self.bits) * self.model_.n_layers

    def finish(self) -> list[LayerScores]:
        n = max(self.n_, 1)
        params = self.params() | {"linears": list(self.linears_), "linear_params": linear_params(self.model_, 0),
                                  "linear_inputs": linear_inputs(self.model_, 0)}
        out = []
        for bi, b in enumerate(self.bits):
            out.append(LayerScores(f"quant_kl_block_int{b}", self.kl_block_[bi] / n, True, ("layer",), self.name,
                                   f"KL(dense || this block's linears at int{b}, group {self.group_size}), nats "
                                   f"per token", params))
            if self.per_linear:
                out.append(LayerScores(f"quant_kl_linear_int{b}", self.kl_linear_[bi] / n, True, ("layer", "linear"),
                                       self.name, f"KL(dense || this linear at int{b}, group {self.group_size}), "
                                       f"nats per token; linears: {', '.join(self.linears_)}", params))
        return out


def zd_score(weight: torch.Tensor) -> float:
    """Fraction of entries more than one standard deviation from the weight's mean."""
    w = weight.detach().float()
    z = (w - w.mean()) / w.std().clamp_min(1e-12)
    return float((z.abs() > 1).float().mean())


@register
@dataclass
class WeightOutliers(Analyzer):
    name: ClassVar[str] = "weight_outliers"

    def start(self, model: Model) -> None:
        self.model_ = model

    def update(self, trace) -> None:  # weight-only: no data
        pass

    def finish(self) -> list[LayerScores]:
        ad, names = self.model_.adapter, block_linears(self.model_)
        zd = [np.mean([zd_score(ad.blocks[i].get_submodule(n).weight) for n in names])
              for i in range(self.model_.n_layers)]
        params = {"linears": names, "linear_params": linear_params(self.model_, 0),
                  "linear_inputs": linear_inputs(self.model_, 0)}
        return [LayerScores("zd", np.array(zd), False, ("layer",), self.name,
                            "ZD: mean over the block's linear weights of the fraction of |z| > 1 (LayerwiseQuant); "
                            "lower = more important", params)]
