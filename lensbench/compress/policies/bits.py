"""Bit allocation policies: which layers get which weight bit-width under an average-bits budget.

The budget is the average weight bit-width over the blocks' linear layers, weighted by their
parameter counts (scales and mins are not counted; the embedding and LM head stay as they are).
All policies write quant Plans; `predicted` holds the exact average they reach.

* `bits-rank` (LayerwiseQuant: Dumitru et al., 2024, "Layer-Wise Quantization"): two levels
  (`levels="hi,lo"`); the n least important blocks by a ranking go to `lo`, the rest to `hi`, with
  n = ceil((hi - budget)/(hi - lo) * L), the fewest that keep the average at or below the budget.
  Rankings: `lim` (the redundancy block cosine), `zd`, `quant` (measured KL of the block at `lo`),
  `random`, or `score:NAME`; `reverse=True` puts the *most* important at `lo` (the control).
* `bits-dp` (the dynamic-programming baseline of EvoPress, Sieberling et al., 2024): knapsack dynamic
  programming on the measured per-unit KL at every bit-width in `levels` — minimise the sum of KLs
  subject to the bits budget — per block or per linear (`unit="linear"`). Assumes the errors add up,
  which the evaluation then checks.
* `bits-bisect` (our reading of a quality-bounded allocation): the largest number of blocks, least
  sensitive first, that can go to `lo` while the calibration KL stays within the budget, which here is
  the quality bound in nats per token; bisection, so about log2(L) end-to-end measurements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...calibration import CalibrationKL
from ..database import Database
from ...errors import PlanError
from ...gpu.ggml import bits_per_weight, ggml_type
from ...gpu.quant import DEFAULT_GROUP_SIZE
from ...profiles import Profile
from ...texts import bbc_news
from ...units import unit_templates
from ..plan import METHODS, SCHEMES, Plan
from ...simquant import block_linears, linear_inputs, linear_params, simulated
from .budgets import check_average, check_group, levels as parse_levels
from .rankings import block_order, names_for, sensitivity
from .registry import PolicyConfig, option, register

_RANKING_HELP = f"which blocks matter least: {', '.join(names_for('bits'))}, quant, random or score:NAME"
SCHEME_HELP = ("the grid measured and saved: asym (lensbench's packed format), sym (what compress --format "
                "compressed-tensors stores), gguf (levels 2,3,4,5,6,8 become Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0; rows not "
                "a multiple of 256 fall back to Q4_0/Q5_0/Q8_0)")


def plan_of(profile: Profile, bits_of: dict[tuple[int, str | None], int], group_size: int, predicted: dict,
            scheme: str = "asym", method: str = "rtn") -> Plan:
    """A quant Plan from {(layer, linear name or None for the whole block): bits}."""
    block = unit_templates(profile.model)["block"]
    specs = {}
    for (layer, name), b in sorted(bits_of.items(), key=lambda t: (t[0][0], t[0][1] or "")):
        key = block.format(i=layer) + (f".{name}" if name else "")
        specs[key] = (b, group_size, scheme, method)
    return Plan.quantize(profile.model, specs, predicted=predicted)


def grid_setup(profile: Profile, cfg: "GridOptions", levels) -> tuple[Profile, Database | None]:
    """Check a bit policy's grid and, with `--database`, open the database, check it holds this model, grid and
    `levels`, and return the profile with the database's scores added (the ranking `hessian`, `hawq`, ... read
    them)."""
    check_group(cfg.group_size, cfg.scheme, cfg.method)
    if not cfg.database:
        return profile, None
    if cfg.method != "gptq":
        raise PlanError(f"--database {cfg.database} holds GPTQ levels: add --method gptq")
    db = Database.open(cfg.database)
    db.check(profile.model.get("fingerprint"), profile.model.get("name"), cfg.group_size, cfg.scheme)
    db.check_bits(levels)
    scores = db.profile().scores
    return Profile(profile.model, profile.data, {**profile.scores, **scores}, profile.meta, profile.tables), db


def recorded(plan: Plan, db: Database | None) -> Plan:
    """The plan with the database it was measured on, so evaluate and compress apply the same weights."""
    if db is not None:
        plan.meta = {**plan.meta, "database": {"folder": str(db.folder), "key": db.key}}
    return plan


def lists_linears(profile: Profile) -> bool:
    """Whether the profile's quantisation analyses recorded the blocks' linears (else the model is read)."""
    return any("linear_params" in s.params for s in profile.scores.values())


def _reads_model(profile: Profile, cfg) -> bool:
    return not lists_linears(profile) and not getattr(cfg, "database", "")  # a GPTQ database lists them too


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
    def of(cls, profile: Profile, scheme: str = "asym", model=None) -> "Costs":
        """From the linears the profile's quantisation analyses recorded, else from `model`'s first block."""
        sizes = next((dict(s.params["linear_params"]) for s in profile.scores.values()
                      if "linear_params" in s.params), None)
        inputs = next((dict(s.params["linear_inputs"]) for s in profile.scores.values()
                       if "linear_inputs" in s.params), None)
        if sizes is None and model is not None:
            sizes, inputs = linear_params(model, 0), linear_inputs(model, 0)
        if sizes is None:
            raise PlanError("the profile does not list the blocks' linear layers: give the model (lensbench plan "
                            "... --model SOURCE), or profile with --analyses quant_sensitivity (or weight_outliers)")
        return cls(sizes, inputs, scheme)

    def linear(self, name: str, bits: int) -> float:
        if self.scheme != "gguf":
            return float(bits)
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


@dataclass(frozen=True)
class GridOptions(PolicyConfig):
    """The quantisation grid every bit policy measures and writes."""

    group_size: int = option(DEFAULT_GROUP_SIZE, "quantisation group size")
    scheme: str = option("asym", SCHEME_HELP, SCHEMES)
    method: str = option("rtn", "rounding written into the plan: rtn (round to nearest) or gptq (from calibration "
                                "Hessians when the plan is evaluated or saved; without --database the searches "
                                "measure rtn)", METHODS)
    database: str = option("", "a GPTQ database folder (lensbench quant-db; with --method gptq): its levels are what "
                               "the searches measure and the plan applies, and its scores rank (hessian, hawq, "
                               "augmented, gptq-kl)")


@dataclass(frozen=True)
class TwoLevelOptions(GridOptions):
    """Bit policies that put blocks at one of two levels, in the order of a ranking."""

    levels: str = option("4,2", "the two bit-widths, high,low")
    seed: int = option(0, "random seed (ranking random)")


@dataclass(frozen=True)
class BitsRankOptions(TwoLevelOptions):
    ranking: str = option("lim", _RANKING_HELP)
    reverse: bool = option(False, "put the most important blocks low (a control)")


@register("bits-rank", BitsRankOptions, needs_model=_reads_model,
          budget="average weight bits over the blocks' linears, between the two levels",
          description="LayerwiseQuant: the least important blocks by a ranking at the low bit-width, the rest high")
def bits_rank(profile: Profile, budget: float, cfg: BitsRankOptions, *, model, texts, progress) -> Plan:
    hi, lo = sorted(parse_levels(cfg.levels, 2, cfg.scheme), reverse=True)  # "4,2" or "2,4": the higher is high
    profile, db = grid_setup(profile, cfg, (hi, lo))
    cost = Costs.of(profile, cfg.scheme, model)
    c_hi, c_lo = cost(None, hi), cost(None, lo)  # bits per weight of a block at each level
    check_average(budget, c_lo, c_hi)
    L = int(profile.model["n_layers"])
    n_lo = math.ceil((c_hi - budget) / (c_hi - c_lo) * L - 1e-9) if c_hi != c_lo else 0  # never above the budget
    order = block_order(profile, cfg.ranking, lo, cfg.seed)
    if cfg.reverse:
        order = order[::-1]
    low = set(order[:n_lo])
    bits_of = {(i, None): (lo if i in low else hi) for i in range(L)}
    return recorded(plan_of(profile, bits_of, cfg.group_size, {"average_bits": cost.average(bits_of), "n_low": n_lo,
                                                               "low_blocks": sorted(low)}, cfg.scheme, cfg.method), db)


@dataclass(frozen=True)
class BitsDpOptions(GridOptions):
    levels: str = option("2,3,4,8", "the bit-widths to choose from")
    unit: str = option("block", "allocate per block or per linear", ("block", "linear"))
    resolution: int = option(4000, "steps of the budget the knapsack works on")
    error: str = option("kl", "the per-unit error the knapsack adds up: kl (measured calibration KL: the profile's "
                              "quant_sensitivity, or the database's gptq-kl per block) or nmse (the database's "
                              "tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), EvoPress's DP input; needs --database)", ("kl", "nmse"))


@register("bits-dp", BitsDpOptions, needs_model=_reads_model,
          budget="average weight bits over the blocks' linears",
          description="knapsack dynamic programming on the measured per-unit KL at each bit-width (EvoPress DP "
                      "baseline)")
def bits_dp(profile: Profile, budget: float, cfg: BitsDpOptions, *, model, texts, progress) -> Plan:
    opts = sorted(parse_levels(cfg.levels, None, cfg.scheme))
    profile, db = grid_setup(profile, cfg, opts)
    cost = Costs.of(profile, cfg.scheme, model)
    check_average(budget, cost(None, opts[0]), cost(None, opts[-1]))
    L = int(profile.model["n_layers"])
    sizes = cost.sizes
    names = list(sizes) if cfg.unit == "linear" else [None]
    units = [(i, n) for i in range(L) for n in names]
    n_params = np.array([cost.size(n) for _, n in units], dtype=np.float64)
    err = np.zeros((len(units), len(opts)))
    for o, b in enumerate(opts):
        s = sensitivity(profile, b, cfg.unit, cfg.error, db is not None)
        linear_names = s.params.get("linears", list(sizes))
        for u, (i, n) in enumerate(units):
            err[u, o] = s.values[i] if n is None else s.values[i, linear_names.index(n)]
    bits = np.array([[cost(n, b) for b in opts] for _, n in units])
    choice = knapsack(err, n_params[:, None] * bits, budget * n_params.sum(), cfg.resolution)
    bits_of = {units[u]: opts[c] for u, c in enumerate(choice)}
    return recorded(plan_of(profile, bits_of, cfg.group_size,
                            {"average_bits": cost.average(bits_of),
                             f"sum_of_unit_{cfg.error}": float(err[np.arange(len(units)), choice].sum())},
                            cfg.scheme, cfg.method), db)


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


class QuantKL:
    """Calibration KL (`lensbench.calibration`) of a bits assignment {(layer, linear name): bits}, with the
    quantisation simulated in place (rounded to nearest, or the levels of a GPTQ `database` folder) and the
    unchanged prefix replayed."""

    def __init__(self, model, texts, group_size: int, scheme: str = "asym", batch_size: int = 4, seq_len: int = 128,
                 database: str = ""):
        self.model, self.group_size, self.scheme = model, group_size, scheme
        self.kl = CalibrationKL(model, texts, batch_size, seq_len)
        # dequantised weights, shared across evaluations: rounded to nearest, or a GPTQ database's levels
        self.cache = Database.open(database).weights(model) if database else {}

    @property
    def runs(self):
        return self.kl.runs

    @property
    def n_tokens(self) -> int:
        return self.kl.n_tokens

    def __call__(self, bits_of: dict[tuple[int, str], int], runs=None) -> float:
        """Mean KL per token on all calibration batches, or on `runs` (a minibatch)."""
        ad = self.model.adapter
        targets = {f"{ad.block_path(i)}.{n}": (b, self.group_size, self.scheme) for (i, n), b in bits_of.items()
                   if b < 16}
        first = min((i for (i, _), b in bits_of.items() if b < 16), default=self.model.n_layers)
        with simulated(self.model, targets, self.cache):
            return self.kl.changed(first, runs)


@dataclass(frozen=True)
class BitsBisectOptions(TwoLevelOptions):
    ranking: str = option("quant", _RANKING_HELP)


@register("bits-bisect", BitsBisectOptions, needs_model=True,
          budget="quality bound: calibration KL to the dense model, nats per token",
          description="bisection for the most blocks (least sensitive first) at the low bit-width within the bound")
def bits_bisect(profile: Profile, budget: float, cfg: BitsBisectOptions, *, model, texts, progress) -> Plan:
    hi, lo = parse_levels(cfg.levels, 2, cfg.scheme)
    profile, db = grid_setup(profile, cfg, (hi, lo))
    if not budget > 0:
        raise PlanError(f"the budget of bits-bisect is a KL bound above 0 (e.g. 0.1), got {budget}")
    L = model.n_layers
    order = block_order(profile, cfg.ranking, lo, cfg.seed)
    texts = list(texts) if texts else bbc_news("calibration", limit=8)
    kl_of = QuantKL(model, texts, cfg.group_size, cfg.scheme, database=cfg.database)
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
    plan = plan_of(profile, bits_of, cfg.group_size,
                   {"average_bits": Costs.of(profile, cfg.scheme, model).average(bits_of), "n_low": a,
                    "calibration_kl": trail[a]}, cfg.scheme, cfg.method)
    plan.meta = {"search": {"evaluations": len(trail), "kl_by_n_low": {str(k): v for k, v in sorted(trail.items())},
                            "tokens": kl_of.n_tokens}}
    return recorded(plan, db)
