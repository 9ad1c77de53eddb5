"""Numerics shared by every score: the precision that log-probabilities and KL divergences are computed in."""
from __future__ import annotations

import torch


def storage_bytes(tensors) -> int:
    """Bytes of the memory behind `tensors`, each storage counted once and whole (a view keeps all of it)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def wide(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 where it already is float64.

    KL divergences between nearby distributions are small differences of O(log vocab) terms, so they are
    computed at least in float32 (half-precision logits are widened), and a float64 model keeps float64:
    two methods that must agree can then be compared at float64 precision.
    """
    return x if x.dtype == torch.float64 else x.float()
