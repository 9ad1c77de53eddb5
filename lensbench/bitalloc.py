"""Bit allocation policies: which layers get which weight bit-width under an average-bits budget.

The budget is the average weight bit-width over the blocks' linear layers, weighted by their
parameter counts (scales and mins are not counted; the embedding and LM head stay as they are).
All policies write `{"op": "quant"}` Plans; `predicted` holds the exact average they reach.

* `bits-rank` (LayerwiseQuant, METHODS.md §7): two levels (`levels="hi,lo"`); the n least important
  blocks by a ranking go to `lo`, the rest to `hi`, with n = ceil((hi - budget)/(hi - lo) * L), the fewest
  that keep the average at or below the budget.
  Rankings: `lim` (the redundancy block cosine), `zd`, `quant` (measured KL of the block at `lo`),
  `random`, or `score:NAME`; `reverse=True` puts the *most* important at `lo` (the control).
* `bits-dp` (EvoPress's DP baseline, §8.3): knapsack dynamic programming on the measured per-unit
  KL at every bit-width in `levels` — minimise the sum of KLs subject to the bits budget — per block
  or per linear (`unit="linear"`). Assumes the errors add up, which the evaluation then checks.
* `bits-bisect` (§8.4, our reading): the largest number of blocks, least sensitive first, that can
  go to `lo` while the calibration KL stays within the budget, which here is the quality bound in
  nats per token; bisection, so about log2(L) end-to-end measurements (needs the model).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import PlanError
from .gpu.ggml import GGUF_BITS
from .gpu.quant import BITS, DEFAULT_GROUP_SIZE, QuantError
from .policies import _ranking_scores, register
from .profile import Profile

RANKINGS = {"lim": "block_cosine", "zd": "zd"}


def _levels(text, n: int | None = None, scheme: str = "asym") -> list[int]:
    if isinstance(text, (list, tuple)):  # levels=(8, 4) from Python, "8,4" from the command line
        text = ",".join(str(b) for b in text)
    try:
        levels = [int(b) for b in str(text).split(",")]
    except ValueError:
        raise PlanError(f"levels {text!r} must be bit-widths separated by commas, e.g. 4,2") from None
    allowed = GGUF_BITS if scheme == "gguf" else BITS
    for b in levels:
        if b not in allowed:
            where = " for the gguf scheme" if scheme == "gguf" else ""
            raise PlanError(f"level {b} is not a supported bit-width{where}; use {', '.join(map(str, allowed))}")
    if n is not None and len(levels) != n:
        raise PlanError(f"levels {text!r} must name {n} bit-widths (high,low)")
    return levels


def _sensitivity(profile: Profile, bits: int, unit: str = "block"):
    name = f"quant_kl_{unit}_int{bits}"
    if name not in profile.scores:
        raise PlanError(f"the profile has no {name!r}: run lensbench profile MODEL --analyses quant_sensitivity "
                        f"(with bits including {bits}{' and per_linear' if unit == 'linear' else ''})")
    return profile.scores[name]


def _linears(profile: Profile) -> dict[str, int]:
    """{name relative to a block: weight elements}, recorded by the quantisation analyses."""
    for s in profile.scores.values():
        if "linear_params" in s.params:
            return dict(s.params["linear_params"])
    raise PlanError("the profile does not list the blocks' linear layers: run lensbench profile MODEL "
                    "--analyses quant_sensitivity (or weight_outliers)")


def _plan(profile: Profile, bits_of: dict[tuple[int, str | None], int], group_size: int, predicted: dict,
          scheme: str = "asym"):
    """A quant Plan from {(layer, linear name or None for the whole block): bits}."""
    from .plan import Plan, unit_templates

    block = unit_templates(profile.model)["block"]
    specs = {}
    for (layer, name), b in sorted(bits_of.items(), key=lambda t: (t[0][0], t[0][1] or "")):
        key = block.format(i=layer) + (f".{name}" if name else "")
        specs[key] = (b, group_size, scheme)
    return Plan.quantize(profile.model, specs, predicted=predicted)


class Costs:
    """Bits per weight of a unit (a linear, or a whole block: None) at each bit-width. Nominal for the asym and
    sym schemes (the budget counts code bits, as the papers do); for the gguf scheme the real bits of the GGML
    type each linear becomes, scales included, so the budget is what the saved file holds (a 576-wide row at
    6 bits is Q8_0: 8.5 bits)."""

    def __init__(self, sizes: dict[str, int], inputs: dict[str, int] | None, scheme: str = "asym"):
        if scheme == "gguf" and not inputs:
            raise PlanError("the profile does not record the linears' input widths, which the gguf scheme's real "
                            "bits need: re-run lensbench profile MODEL --analyses quant_sensitivity (or "
                            "weight_outliers)")
        self.sizes, self.inputs, self.scheme = sizes, inputs or {}, scheme
        self.block = sum(sizes.values())

    @classmethod
    def of(cls, profile: Profile, scheme: str = "asym") -> "Costs":
        inputs = next((dict(s.params["linear_inputs"]) for s in profile.scores.values()
                       if "linear_inputs" in s.params), None)
        return cls(_linears(profile), inputs, scheme)

    def linear(self, name: str, bits: int) -> float:
        if self.scheme != "gguf":
            return float(bits)
        from .gpu.ggml import bits_per_weight, ggml_type

        return bits_per_weight(ggml_type(bits, self.inputs[name]))

    def __call__(self, name: str | None, bits: int) -> float:
        """Bits per weight of one linear, or of a whole block (None), at `bits`."""
        if name is not None:
            return self.linear(name, bits)
        return sum(self.linear(n, bits) * k for n, k in self.sizes.items()) / self.block

    def size(self, name: str | None) -> int:
        return self.sizes[name] if name else self.block

    def average(self, bits_of: dict[tuple[int, str | None], int]) -> float:
        num = sum(self(name, b) * self.size(name) for (_, name), b in bits_of.items())
        return num / sum(self.size(name) for (_, name) in bits_of)



def _check_budget(budget: float, lo: float, hi: float) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        lo, hi = f"{lo:.4g}", f"{hi:.4g}"
        raise PlanError(f"average bits {budget} cannot be met with levels {hi} and {lo}: give a budget between "
                        f"{lo} and {hi}")


def _check_group(group_size: int, scheme: str = "asym") -> int:
    """The group size and scheme, checked (the gguf scheme's types fix their own blocks)."""
    from .plan import check_quant

    try:
        check_quant(GGUF_BITS[0] if scheme == "gguf" else BITS[0], group_size, scheme)
    except QuantError as exc:
        raise PlanError(str(exc)) from None
    return group_size


def block_order(profile: Profile, ranking: str, lo: int, seed: int = 0) -> list[int]:
    """Blocks least important first by a bit-allocation ranking."""
    L = int(profile.model["n_layers"])
    if ranking == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(L)]
    if ranking == "quant":
        scores = _sensitivity(profile, lo)
    else:
        name = RANKINGS.get(ranking, ranking[len("score:"):] if ranking.startswith("score:") else None)
        if name is None:
            raise PlanError(f"unknown ranking {ranking!r} for bit allocation: use lim, zd, quant, random or "
                            f"score:<name>")
        scores = _ranking_scores(profile, f"score:{name}", "block")
    return scores.ranking()[::-1]


@register("bits-rank", "average weight bits over the blocks' linears, between the two levels",
          "LayerwiseQuant: the least important blocks by a ranking at the low bit-width, the rest high")
def bits_rank(profile: Profile, budget: float, *, ranking: str = "lim", levels: str = "4,2", reverse: bool = False,
              group_size: int = DEFAULT_GROUP_SIZE, scheme: str = "asym", seed: int = 0, **_):
    _check_group(group_size, scheme)
    hi, lo = sorted(_levels(levels, 2, scheme), reverse=True)  # "4,2" or "2,4": the higher level is the high one
    cost = Costs.of(profile, scheme)
    c_hi, c_lo = cost(None, hi), cost(None, lo)  # bits per weight of a block at each level
    _check_budget(budget, c_lo, c_hi)
    L = int(profile.model["n_layers"])
    n_lo = math.ceil((c_hi - budget) / (c_hi - c_lo) * L - 1e-9) if c_hi != c_lo else 0  # never above the budget
    order = block_order(profile, ranking, lo, seed)
    if reverse:
        order = order[::-1]
    low = set(order[:n_lo])
    bits_of = {(i, None): (lo if i in low else hi) for i in range(L)}
    return _plan(profile, bits_of, group_size, {"average_bits": cost.average(bits_of), "n_low": n_lo,
                                                "low_blocks": sorted(low)}, scheme)


@register("bits-dp", "average weight bits over the blocks' linears",
          "knapsack dynamic programming on the measured per-unit KL at each bit-width (EvoPress DP baseline)")
def bits_dp(profile: Profile, budget: float, *, levels: str = "2,3,4,8", unit: str = "block",
            group_size: int = DEFAULT_GROUP_SIZE, scheme: str = "asym", resolution: int = 4000, **_):
    if unit not in ("block", "linear"):
        raise PlanError(f"bits-dp allocates per 'block' or per 'linear', not {unit!r}")
    _check_group(group_size, scheme)
    opts = sorted(_levels(levels, None, scheme))
    cost = Costs.of(profile, scheme)
    _check_budget(budget, cost(None, opts[0]), cost(None, opts[-1]))
    L = int(profile.model["n_layers"])
    sizes = cost.sizes
    names = list(sizes) if unit == "linear" else [None]
    units = [(i, n) for i in range(L) for n in names]
    n_params = np.array([cost.size(n) for _, n in units], dtype=np.float64)
    err = np.zeros((len(units), len(opts)))
    for o, b in enumerate(opts):
        s = _sensitivity(profile, b, unit)
        linear_names = s.params.get("linears", list(sizes))
        for u, (i, n) in enumerate(units):
            err[u, o] = s.values[i] if n is None else s.values[i, linear_names.index(n)]
    bits = np.array([[cost(n, b) for b in opts] for _, n in units])
    choice = knapsack(err, n_params[:, None] * bits, budget * n_params.sum(), resolution)
    bits_of = {units[u]: opts[c] for u, c in enumerate(choice)}
    return _plan(profile, bits_of, group_size, {"average_bits": cost.average(bits_of),
                                                "sum_of_unit_kl": float(err[np.arange(len(units)), choice].sum())},
                 scheme)


def knapsack(err: np.ndarray, cost: np.ndarray, budget: float, resolution: int = 4000) -> list[int]:
    """Option per unit minimising sum(err) with sum(cost) <= budget (costs rounded up onto `resolution`
    steps of the budget, so the result never exceeds it). err, cost: [units, options]."""
    step = budget / resolution
    c = np.ceil(cost / step - 1e-9).astype(np.int64)
    if c.min(1).sum() > resolution:
        raise PlanError("the budget is below what the lowest bit-width costs: give a larger average")
    inf = np.inf
    best = np.full(resolution + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(err), resolution + 1), dtype=np.int16)
    for u in range(len(err)):
        new = np.full(resolution + 1, inf)
        for o in range(err.shape[1]):
            shifted = np.full(resolution + 1, inf)
            if c[u, o] <= resolution:
                shifted[c[u, o]:] = best[:resolution + 1 - c[u, o]] + err[u, o]
            better = shifted < new
            new[better] = shifted[better]
            picks[u, better] = o
        best = new
    spent = int(np.argmin(best))
    choice = []
    for u in range(len(err) - 1, -1, -1):
        o = int(picks[u, spent])
        choice.append(o)
        spent -= c[u, o]
    return choice[::-1]


@register("bits-bisect", "quality bound: calibration KL to the dense model, nats per token",
          "bisection for the most blocks (least sensitive first) at the low bit-width within the bound",
          needs_model=True)
def bits_bisect(profile: Profile, budget: float, *, model=None, texts=None, ranking: str = "quant",
                levels: str = "4,2", group_size: int = DEFAULT_GROUP_SIZE, scheme: str = "asym", seed: int = 0,
                **_):
    from .simquant import block_linears
    from .texts import bbc_news

    _check_group(group_size, scheme)
    hi, lo = _levels(levels, 2, scheme)
    if not budget > 0:
        raise PlanError(f"the budget of bits-bisect is a KL bound above 0 (e.g. 0.1), got {budget}")
    L = model.n_layers
    order = block_order(profile, ranking, lo, seed)
    texts = list(texts) if texts else bbc_news("calibration", limit=8)
    kl_of = CalibrationKL(model, texts, group_size, scheme)
    names = block_linears(model)

    def bits_for(n: int) -> dict[tuple[int, str | None], int]:
        low = set(order[:n])
        return {(i, None): (lo if i in low else hi) for i in range(L)}

    def kl(n: int) -> float:
        return kl_of({(i, name): b for (i, _), b in bits_for(n).items() for name in names})

    trail = {0: kl(0)}
    if trail[0] > budget:
        raise PlanError(f"even with every block at int{hi} the calibration KL is {trail[0]:.4f} > {budget}: give a "
                        f"larger bound or a higher level")
    a, b = 0, L  # kl(a) <= budget; search the largest such n
    while a < b:
        mid = (a + b + 1) // 2
        trail[mid] = kl(mid)
        a, b = (mid, b) if trail[mid] <= budget else (a, mid - 1)
    bits_of = bits_for(a)
    plan = _plan(profile, bits_of, group_size, {"average_bits": Costs.of(profile, scheme).average(bits_of), "n_low": a,
                                                "calibration_kl": trail[a]}, scheme)
    plan.meta = {"search": {"evaluations": len(trail), "kl_by_n_low": {str(k): v for k, v in sorted(trail.items())},
                            "tokens": kl_of.n_tokens}}
    return plan


def make_plan_quiet(policy: str, profile: Profile, budget: float, **options):
    """A plan from another bit policy, or None when the profile cannot make it (used for search seeds)."""
    from .policies import POLICIES

    try:
        return POLICIES[policy].fn(profile, budget, **options)
    except PlanError:
        return None


class CalibrationKL:
    """KL(dense || quantised) per token on calibration text for a bits assignment
    {(layer, linear name): bits}, with the quantisation simulated and the unchanged prefix replayed."""

    def __init__(self, model, texts, group_size: int, scheme: str = "asym", batch_size: int = 4, seq_len: int = 128):
        from .capture import batches
        from .replay import DenseRun

        self.model, self.group_size, self.scheme = model, group_size, scheme
        self.runs = [DenseRun.from_batch(model, b) for b in batches(model, texts, batch_size, seq_len)]
        self.cache: dict = {}  # dequantised weights, shared across evaluations
        self.n_tokens = 0

    def __call__(self, bits_of: dict[tuple[int, str], int], runs=None) -> float:
        """Mean KL per token on all calibration batches, or on `runs` (a minibatch)."""
        from .replay import states_from, token_scores
        from .simquant import simulated

        ad = self.model.adapter
        targets = {f"{ad.block_path(i)}.{n}": (b, self.group_size, self.scheme) for (i, n), b in bits_of.items()
                   if b < 16}
        first = min((i for (i, _), b in bits_of.items() if b < 16), default=self.model.n_layers)
        total, n = 0.0, 0
        with simulated(self.model, targets, self.cache):
            for run in self.runs if runs is None else runs:
                kl, _ = token_scores(self.model, run, states_from(self.model, run, first))
                total += float(kl.sum())
                n += run.n_tokens
        self.n_tokens += n
        return total / n


from . import evo_bits  # noqa: E402,F401  (registers the evolutionary bit search)
