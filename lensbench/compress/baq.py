"""BAQ: bit-widths across the input columns of each weight matrix, from GPTQ's column losses (Zhang, Wang,
Lasaulce & Debbah, 2025, "BAQ: Efficient Bit Allocation Quantization for Large Language Models", arXiv
2506.05664).

GPTQ at a reference width R gives each input column j its loss L_j = Σ_rows (w - q)² / [U]_jj² (`gptq.Result`).
BAQ models the loss at width b as L_j(b) = c_j 2^(-2b), c_j = L_j(R) 2^(2R), and minimises Σ_j L_j(b_j) at a
given average width: the reverse water-filling of rate-distortion theory, whose closed form is
b_j = B + ½ log₂(c_j / geomean(c)) — every column then adds the same loss. The paper rounds it to a (not
necessarily power-of-two) number of levels per column; here the unit is a quantisation group (its columns share a
scale and min per row anyway) and the widths are the packed format's, so the same kernels run the result
(`gpu.mixed`): `allocate` solves the integer version exactly — the loss model is convex in b, so taking the
upgrade with the largest loss drop per bit until the budget is spent is optimal, up to the last step that no
longer fits. GPTQ then runs again with those widths (`gptq_weight` with per-group bits).

The realised average is at most the budget (below it when no upgrade fits the rest) and is reported.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..gpu.quant import BITS, QuantError
from .gptq import GPTQConfig, Result, gptq_weight


@dataclass(frozen=True)
class BAQConfig:
    levels: tuple[int, ...] = BITS  # the widths a group may take
    reference: int = 0  # width of the GPTQ pass that measures the column losses; 0: the level at or below the budget


def reference_bits(budget: float, levels: Sequence[int]) -> int:
    below = [b for b in levels if b <= budget + 1e-9]
    if not below:
        raise QuantError(f"an average of {budget:g} bits is below the lowest level {min(levels)}: give a larger "
                         f"budget or a lower level")
    return max(below)


def allocate(loss: Sequence[float], sizes: Sequence[int], reference: int, budget: float,
             levels: Sequence[int] = BITS) -> list[int]:
    """A width from `levels` per group minimising Σ_g c_g 2^(-2 b_g), c_g = loss_g 2^(2·reference), subject to
    Σ_g sizes_g b_g ≤ budget Σ_g sizes_g (module docstring)."""
    levels = sorted(set(levels))
    sizes = np.asarray(sizes, dtype=np.float64)
    if len(loss) != len(sizes) or not len(sizes):
        raise QuantError("give one loss per group")
    if budget < levels[0] - 1e-9:
        raise QuantError(f"an average of {budget:g} bits is below the lowest level {levels[0]}: give a larger budget")
    c = np.asarray(loss, dtype=np.float64) * 4.0 ** reference
    if not np.isfinite(c).all():
        raise QuantError("the column losses hold NaN or Inf: check the weights and the calibration Hessian")
    level = [0] * len(sizes)
    spare = budget * sizes.sum() - levels[0] * sizes.sum() + 1e-9 * sizes.sum()
    heap = []

    def push(g: int) -> None:
        i = level[g]
        if i + 1 < len(levels):
            lo, hi = levels[i], levels[i + 1]
            gain = c[g] * (4.0 ** -lo - 4.0 ** -hi) / (hi - lo)  # loss dropped per bit of this group
            heapq.heappush(heap, (-gain, g))

    for g in range(len(sizes)):
        push(g)
    while heap:
        _, g = heapq.heappop(heap)
        cost = (levels[level[g] + 1] - levels[level[g]]) * sizes[g]
        if cost > spare:
            continue  # this group's next width does not fit; cheaper upgrades of others may
        spare -= cost
        level[g] += 1
        push(g)
    return [levels[i] for i in level]


def closed_form(loss: Sequence[float], reference: int, budget: float) -> np.ndarray:
    """The real-valued widths of the closed form, b_j = budget + ½ log₂(c_j / geomean(c)) (for reports)."""
    c = np.maximum(np.asarray(loss, dtype=np.float64), 1e-300) * 4.0 ** reference
    return budget + 0.5 * np.log2(c / math.exp(np.log(c).mean()))


def group_sums(column_loss: torch.Tensor, group_size: int) -> tuple[list[float], list[int]]:
    """(loss per input group, columns per group)."""
    k = column_loss.shape[0]
    bounds = [(g, min(g + group_size, k)) for g in range(0, k, group_size)]
    return [float(column_loss[a:b].sum()) for a, b in bounds], [b - a for a, b in bounds]


@dataclass
class BAQResult:
    """BAQ of one linear: its GPTQ result at the allocated widths, the reference run's and the widths."""

    result: Result
    reference: Result
    group_bits: list[int]

    @property
    def rate(self) -> float:
        """The realised average width: at most the budget, below it when no upgrade fits the rest."""
        return float(self.result.packed.bits)


def baq_weight(weight: torch.Tensor, hessian: torch.Tensor, budget: float, group_size: int,
               symmetric: bool = False, cfg: GPTQConfig | None = None, baq: BAQConfig | None = None) -> BAQResult:
    """BAQ of one weight [N, K] with its Hessian at an average of `budget` bits per weight."""
    cfg, baq = cfg or GPTQConfig(), baq or BAQConfig()
    ref_bits = baq.reference or reference_bits(budget, baq.levels)
    ref = gptq_weight(weight, hessian, ref_bits, group_size, symmetric, cfg)
    loss, sizes = group_sums(ref.column_loss, ref.packed.group_size)
    widths = allocate(loss, sizes, ref_bits, budget, baq.levels)
    bits = widths[0] if len(set(widths)) == 1 else widths
    result = ref if bits == ref_bits else gptq_weight(weight, hessian, bits, group_size, symmetric, cfg)
    return BAQResult(result, ref, widths)
