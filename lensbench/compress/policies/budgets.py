"""What a budget means and whether it can be met: unit counts, skip speed-ups, bit levels and averages."""
from __future__ import annotations

import math

from ...errors import PlanError
from ...gpu.ggml import GGUF_BITS
from ...gpu.quant import BITS, QuantError
from ..plan import Quant


def unit_count(budget: float, n_candidates: int, what: str, limit: int | None = None) -> int:
    """A count (>= 1) or a fraction (< 1) of `n_candidates`, checked against `limit`."""
    if not budget > 0 or math.isinf(budget):
        raise PlanError(f"budget must be a positive count or a fraction below 1, got {budget}")
    k = int(round(budget * n_candidates)) if budget < 1 else int(budget)
    if budget >= 1 and budget != int(budget):
        raise PlanError(f"budget {budget} is neither a whole count nor a fraction below 1")
    limit = n_candidates if limit is None else limit
    if k < 1:
        raise PlanError(f"budget {budget} removes no {what} of {n_candidates}: give a larger budget")
    if k > limit:
        raise PlanError(f"budget {budget} asks to remove {k} {what}, but at most {limit} of {n_candidates} can go: "
                        f"give a smaller budget")
    return k


def kept_for_speedup(speedup: float, L: int, minimum: int) -> int:
    """Layers kept for a target layer-compute speed-up r: round(L / r)."""
    if not speedup > 1 or math.isinf(speedup):
        raise PlanError(f"budget for a skip policy is the target speed-up, a number above 1 (e.g. 1.25), got {speedup}")
    keep = int(round(L / speedup))
    if keep >= L:
        raise PlanError(f"speed-up {speedup} skips no layer of {L}: give at least {L / (L - 0.5):.3f}")
    if keep < minimum:
        raise PlanError(f"speed-up {speedup} would keep {keep} of {L} layers; at most {L / (minimum - 0.5):.2f} "
                        f"keeps the {minimum} this policy needs")
    return keep


def levels(text, n: int | None = None, scheme: str = "asym") -> list[int]:
    """Bit-widths from "4,2" (the command line) or (4, 2) (Python), each supported by `scheme`."""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(b) for b in text)
    try:
        out = [int(b) for b in str(text).split(",")]
    except ValueError:
        raise PlanError(f"levels {text!r} must be bit-widths separated by commas, e.g. 4,2") from None
    allowed = GGUF_BITS if scheme == "gguf" else BITS
    for b in out:
        if b not in allowed:
            where = " for the gguf scheme" if scheme == "gguf" else ""
            raise PlanError(f"level {b} is not a supported bit-width{where}; use {', '.join(map(str, allowed))}")
    if n is not None and len(out) != n:
        raise PlanError(f"levels {text!r} must name {n} bit-widths (high,low)")
    return out


def check_average(budget: float, lo: float, hi: float) -> None:
    """An average-bits budget between the lowest and the highest level's bits per weight."""
    lo, hi = min(lo, hi), max(lo, hi)
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise PlanError(f"average bits {budget} cannot be met with levels from {lo:.4g} to {hi:.4g} bits: give a "
                        f"budget between {lo:.4g} and {hi:.4g}")


def check_group(group_size: int, scheme: str = "asym", method: str = "rtn") -> int:
    """The group size, scheme and rounding, checked (the gguf scheme's types fix their own blocks)."""
    try:
        Quant(GGUF_BITS[0] if scheme == "gguf" else BITS[0], group_size, scheme, method)
    except QuantError as exc:
        raise PlanError(str(exc)) from None
    return group_size
