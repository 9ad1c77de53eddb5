"""EvoPress-style evolutionary search over bit-widths (METHODS.md §8.3, quantisation variant), scored
end to end: a state is one bit-width per unit (block, or linear layer of a block); the budget is
the parameter-weighted average bits over the blocks' linears, which every state keeps at or below.

A child takes 1-3 moves (min of two draws, biased to 1): one unit up a level and another unit of
the same size down a level; if that leaves the average above the budget, random units go down
until it fits. Selection is multi-step as for depth (`lensbench.evo`): children on one calibration
minibatch, the best `survivors` and the parent (elitist) on all calibration text. Fitness is the
calibration KL to the dense model with the quantisation simulated in place (`lensbench.simquant`;
identical to the packed weights up to float summation order). The population starts from uniform
bits (the highest level within the budget), the knapsack DP's and the rank-and-threshold
allocations (when the profile has the sensitivities) and random states, so the search never ends
worse on calibration text than those.
"""
from __future__ import annotations

import random
import sys

from tqdm import tqdm

from .errors import PlanError
from .gpu.quant import DEFAULT_GROUP_SIZE
from .policies import register

Key = tuple[int, str]


@register("evo-bits", "average weight bits over the blocks' linears",
          "evolutionary search over bit-widths scored by calibration KL (EvoPress, quantisation)", needs_model=True)
def evo_bits(profile, budget: float, *, model=None, texts=None, levels: str = "2,3,4,8", unit: str = "block",
             group_size: int = DEFAULT_GROUP_SIZE, scheme: str = "asym", generations: int = 20, offspring: int = 8,
             seed: int = 0, progress: bool = False, **_):
    from .bitalloc import CalibrationKL, Costs, _check_budget, _check_group, _levels, _plan, make_plan_quiet
    from .simquant import block_linears, linear_inputs, linear_params
    from .texts import bbc_news

    _check_group(group_size, scheme)
    opts = sorted(_levels(levels, None, scheme))
    if unit not in ("block", "linear"):
        raise PlanError(f"evo-bits searches per 'block' or per 'linear', not {unit!r}")
    L, names = model.n_layers, block_linears(model)
    cost = Costs(linear_params(model, 0), linear_inputs(model, 0), scheme)
    _check_budget(budget, cost(None, opts[0]), cost(None, opts[-1]))
    units = [(i, None) for i in range(L)] if unit == "block" else [(i, n) for i in range(L) for n in names]
    n_params = {u: cost.size(u[1]) for u in units}

    def avg(state: dict) -> float:
        return cost.average(state)

    rng = random.Random(seed)
    texts = list(texts) if texts else bbc_news("calibration", limit=8)
    fit = CalibrationKL(model, texts, group_size, scheme, batch_size=2)

    def expand(state: dict) -> dict[Key, int]:
        return {(i, n): b for (i, u), b in state.items() for n in (names if u is None else [u])}

    cache: dict[tuple, float] = {}

    def full(state: dict) -> float:
        key = tuple(state[u] for u in units)
        if key not in cache:
            cache[key] = fit(expand(state))
        return cache[key]

    def repair(state: dict) -> dict | None:
        for _ in range(10 * len(units)):
            if avg(state) <= budget + 1e-9:
                return state
            u = rng.choice([u for u in units if state[u] > opts[0]])
            state[u] = opts[opts.index(state[u]) - 1]
        return None

    def mutate(parent: dict) -> dict | None:
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
    for name, kw in (("dp", {"unit": unit}), ("rank-quant", {"ranking": "quant", "levels": f"{opts[-1]},{opts[0]}"})):
        plan = make_plan_quiet("bits-dp" if name == "dp" else "bits-rank", profile, budget, group_size=group_size,
                               scheme=scheme, **kw)
        if plan is not None:
            seeds[name] = _state_of(plan, units, profile)
    flat = max((b for b in opts if b <= budget + 1e-9), default=None)
    if flat is not None:  # uniform bits: the baseline any allocation has to beat
        seeds[f"uniform-int{flat}"] = {u: flat for u in units}
    for j in range(4):
        s = repair({u: rng.choice(opts) for u in units})
        if s is not None:
            seeds[f"random{j}"] = s
    if not seeds:
        raise PlanError("no starting allocation fits the budget: give a larger average")
    start = {k: full(v) for k, v in seeds.items()}
    parent = min(seeds.values(), key=full)
    history = [full(parent)]
    n_mini = 0
    bar = tqdm(range(generations), desc="bit search", unit="gen", disable=not progress, file=sys.stderr, leave=False)
    for _ in bar:
        children = []
        for _try in range(50 * offspring):
            if len(children) >= offspring:
                break
            c = mutate(parent)
            if c is not None and c != parent and c not in children:
                children.append(c)
        mini = [rng.choice(fit.runs)]
        n_mini += len(children)
        scored = sorted(children, key=lambda c: fit(expand(c), mini))[:2]
        parent = min([*scored, parent], key=full)
        history.append(full(parent))
        bar.set_postfix(kl=f"{history[-1]:.4f}")
    plan = _plan(profile, parent, group_size, {"average_bits": avg(parent), "calibration_kl": history[-1]}, scheme)
    plan.meta = {"search": {"calibration_kl_by_generation": history, "start_calibration_kl": start,
                            "full_evaluations": len(cache), "minibatch_evaluations": n_mini,
                            "tokens_forwarded": fit.n_tokens}}
    return plan


def _state_of(plan, units, profile) -> dict:
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
