"""`evo-bits`: bit-widths by EvoPress's evolutionary search (the loop is `search.evolve`), scored end to end.

A state is one bit-width per unit (block, or linear layer of a block); the budget is the parameter-weighted
average bits over the blocks' linears, which every state keeps at or below. A child takes 1-3 moves (min of two
draws, biased to 1): one unit up a level and another unit of the same size down a level; if that leaves the
average above the budget, random units go down until it fits. Fitness is the calibration KL to the dense model
with the quantisation simulated in place (`simquant`; identical to the packed weights up to float summation
order). The population starts from uniform bits (the highest level within the budget), the knapsack DP's and
the rank-and-threshold allocations (when the profile has the sensitivities) and random states.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ...capture import batches
from ...executor import Workers
from ...profiles import Profile
from ...texts import bbc_news
from ..plan import Plan
from ...simquant import block_linears
from .bits import Costs, GridOptions, QuantKL, grid_setup, plan_of, recorded
from .budgets import check_average, levels as parse_levels
from .registry import option, quiet_plan, register
from .search import FitnessWork, Scored, SearchConfig, evolve

Key = tuple[int, str | None]


@dataclass(frozen=True)
class EvoBitsOptions(GridOptions):
    levels: str = option("2,3,4,8", "the bit-widths to choose from")
    unit: str = option("block", "one bit-width per block or per linear", ("block", "linear"))
    generations: int = option(20, "generations of the search")
    offspring: int = option(8, "children per generation")
    seed: int = option(0, "random seed")


class QuantWork(FitnessWork):
    """The bit search's fitness: the calibration KL with [[layer, linear, bits], ...] simulated (each worker runs
    the dense model once, in `setup`)."""

    batch_size, seq_len = 2, 128

    def __init__(self, texts: list[str], group_size: int, scheme: str, database: str = ""):
        self.texts, self.group_size, self.scheme, self.database = texts, group_size, scheme, database

    def setup(self, model) -> None:
        self.fit = QuantKL(model, self.texts, self.group_size, self.scheme, self.batch_size, self.seq_len,
                           self.database)

    def score(self, bits, runs) -> float:
        return self.fit({(i, n): b for i, n, b in bits}, runs)


@register("evo-bits", EvoBitsOptions, needs_model=True, sweeps=True,
          budget="average weight bits over the blocks' linears",
          description="evolutionary search over bit-widths scored by calibration KL (EvoPress, quantisation)")
def evo_bits(profile: Profile, budget: float, cfg: EvoBitsOptions, *, model, texts, progress,
             executor=None) -> Plan:
    opts = sorted(parse_levels(cfg.levels, None, cfg.scheme))
    profile, db = grid_setup(profile, cfg, opts)
    L, names = model.n_layers, block_linears(model)
    cost = Costs.of(profile, cfg.scheme, model)
    check_average(budget, cost(None, opts[0]), cost(None, opts[-1]))
    units: list[Key] = [(i, None) for i in range(L)] if cfg.unit == "block" else [(i, n) for i in range(L)
                                                                                   for n in names]
    n_params = {u: cost.size(u[1]) for u in units}
    rng = random.Random(cfg.seed)
    texts = list(texts) if texts else bbc_news("calibration", limit=8)

    def payload(state: dict) -> list:
        """[[layer, linear, bits], ...] of every linear, sorted: the state as a worker reads it."""
        return sorted([i, n, b] for (i, u), b in state.items() for n in (names if u is None else [u]))

    def repair(state: dict) -> dict | None:
        for _ in range(10 * len(units)):
            if cost.average(state) <= budget + 1e-9:
                return state
            u = rng.choice([u for u in units if state[u] > opts[0]])
            state[u] = opts[opts.index(state[u]) - 1]
        return None

    def mutate(parent: dict, rng: random.Random) -> dict | None:
        child = dict(parent)
        for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
            up = rng.choice([u for u in units if child[u] < opts[-1]] or units)
            same = [u for u in units if u != up and n_params[u] == n_params[up] and child[u] > opts[0]]
            if child[up] < opts[-1]:
                child[up] = opts[opts.index(child[up]) + 1]
            if same:
                down = rng.choice(same)
                child[down] = opts[opts.index(child[down]) - 1]
        return repair(child)

    seeds: dict[str, dict] = {}
    common = {"group_size": cfg.group_size, "scheme": cfg.scheme, "method": cfg.method, "database": cfg.database}
    for name, plan in (("dp", quiet_plan("bits-dp", profile, budget, unit=cfg.unit, **common)),
                       ("rank-quant", quiet_plan("bits-rank", profile, budget, ranking="gptq-kl" if db else "quant",
                                                 levels=f"{opts[-1]},{opts[0]}", **common))):
        if plan is not None:
            seeds[name] = _state_of(plan, units, profile)
    flat = max((b for b in opts if b <= budget + 1e-9), default=None)
    if flat is not None:  # uniform bits: the baseline any allocation has to beat
        seeds[f"uniform-int{flat}"] = {u: flat for u in units}
    for j in range(4):
        s = repair({u: rng.choice(opts) for u in units})
        if s is not None:
            seeds[f"random{j}"] = s
    n_runs = len(list(batches(model, texts, QuantWork.batch_size, QuantWork.seq_len)))
    with Workers(QuantWork(texts, cfg.group_size, cfg.scheme, cfg.database), model, executor) as workers:
        fit = Scored(payload, workers)
        found = evolve(seeds, fit.full, fit.mini, mutate, list(range(n_runs)),
                       SearchConfig(cfg.generations, cfg.offspring, seed=cfg.seed), rng, progress, "bit search",
                       ahead=fit.ahead)
    plan = plan_of(profile, found.best, cfg.group_size,
                   {"average_bits": cost.average(found.best), "calibration_kl": found.fitness}, cfg.scheme, cfg.method)
    plan.meta = {"search": {"calibration_kl_by_generation": found.history, "start_calibration_kl": found.start,
                            "full_evaluations": fit.n_full, "minibatch_evaluations": found.n_mini,
                            "tokens_forwarded": fit.tokens}}
    return recorded(plan, db)


def _state_of(plan: Plan, units: list[Key], profile: Profile) -> dict:
    block = profile.model["units"]["block"]
    actions = plan.quant_actions()
    out = {}
    for i, n in units:
        key = block.format(i=i) + (f".{n}" if n else "")
        if key in actions:
            out[(i, n)] = actions[key].bits
        else:  # a per-linear state seeded from a per-block plan
            out[(i, n)] = actions[block.format(i=i)].bits
    return out
