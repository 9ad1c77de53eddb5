"""A weight whose input-column groups have different bit-widths (BAQ's allocation, `compress.baq`), held as one
ordinary PackedWeight per width so the same kernels run it.

Group g covers inputs [g·G, (g+1)·G) of every row (the last one may be shorter) and is stored at `group_bits[g]`.
The groups of one width are gathered, in order, into a [N, K_b] PackedWeight with the same group size, so their
grids (a scale and min per row and group) are exactly those of the unsplit layout; only the last group of the whole
matrix can be short, and it stays last in its part. A matmul (`modules.MixedQuantLinear`) is one packed matmul
per width on the input columns of its groups, summed:

    y = Σ_b x[..., cols_b] @ W_b.T

Nothing here is dense: `dequantize` is for tests, simulation and writers that store dense weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .quant import BITS, PackedWeight, QuantError, pack, quantize
from .reference import dequantize


@dataclass
class MixedWeight:
    """Per-width parts of one [N, K] weight: (input columns [K_b] int64, PackedWeight [N, K_b]) by width."""

    parts: list[tuple[torch.Tensor, PackedWeight]]
    group_bits: tuple[int, ...]
    group_size: int
    shape: tuple[int, int]

    @property
    def bits(self) -> float:
        """The average code bits per weight (the realised rate)."""
        k = self.shape[1]
        return sum(b * (min(self.group_size, k - g * self.group_size))
                   for g, b in enumerate(self.group_bits)) / k

    @property
    def nbytes(self) -> int:
        return sum(pw.nbytes + cols.untyped_storage().nbytes() for cols, pw in self.parts)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype)
        for cols, pw in self.parts:
            out[:, cols] = dequantize(pw, dtype=dtype)
        return out

    def to(self, device) -> "MixedWeight":
        return MixedWeight([(c.to(device), pw.to(device)) for c, pw in self.parts], self.group_bits,
                           self.group_size, self.shape)

    def __repr__(self) -> str:
        n, k = self.shape
        widths = ", ".join(f"int{pw.bits} x {len(c)}" for c, pw in self.parts)
        return f"MixedWeight([{n}, {k}], group {self.group_size}, {widths} columns, {self.bits:.3f} bits)"


def check_group_bits(group_bits: Sequence[int], group_size: int, in_features: int, name: str = "the weight") -> None:
    """One line when `group_bits` does not give one supported width per input group of `name`."""
    if group_size <= 0:
        raise QuantError(f"{name}: per-group bit-widths need a positive group size, not {group_size}")
    n_groups = -(-in_features // group_size)
    if len(group_bits) != n_groups:
        raise QuantError(f"{name}: {len(group_bits)} group bit-widths given, but {in_features} inputs in groups of "
                         f"{group_size} make {n_groups} groups: make the plan again for this model")
    bad = [b for b in group_bits if isinstance(b, bool) or b not in BITS]
    if bad:
        raise QuantError(f"{name}: group bit-width {bad[0]!r} is not supported; use {', '.join(map(str, BITS))}")


def columns(group_bits: Sequence[int], group_size: int, in_features: int) -> dict[int, torch.Tensor]:
    """{width: the input columns of its groups, in order}."""
    out: dict[int, list[int]] = {}
    for g, b in enumerate(group_bits):
        out.setdefault(b, []).extend(range(g * group_size, min((g + 1) * group_size, in_features)))
    return {b: torch.tensor(c, dtype=torch.int64) for b, c in sorted(out.items())}


def split(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_bits: Sequence[int],
          group_size: int, shape: tuple[int, int]) -> MixedWeight:
    """A MixedWeight from codes [N, ≥K] (each group's codes on its own width) and scales, mins [N, G]."""
    n, k = shape
    check_group_bits(group_bits, group_size, k)
    parts = []
    for b, cols in columns(group_bits, group_size, k).items():
        gs = [g for g, gb in enumerate(group_bits) if gb == b]
        kb = len(cols)
        c = torch.zeros(n, -(-kb // 8) * 8)
        c[:, :kb] = codes[:, cols]
        parts.append((cols, pack(c, scales[:, gs], mins[:, gs], b, group_size, (n, kb))))
    return MixedWeight(parts, tuple(int(b) for b in group_bits), group_size, (n, k))


@torch.no_grad()
def quantize_mixed(weight: torch.Tensor, group_bits: Sequence[int], group_size: int,
                   symmetric: bool = False) -> MixedWeight:
    """Round-to-nearest of `weight` [N, K] with each input group at its own width: the same grids as `quantize`
    at that width would fit to those groups."""
    n, k = weight.shape
    check_group_bits(group_bits, group_size, k)
    parts = [(cols, quantize(weight[:, cols], b, group_size, symmetric=symmetric))
             for b, cols in columns(group_bits, group_size, k).items()]
    return MixedWeight(parts, tuple(int(b) for b in group_bits), group_size, (n, k))
