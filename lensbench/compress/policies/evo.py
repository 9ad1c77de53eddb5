"""`evo`: which units to remove, by EvoPress's evolutionary search (the loop is `search.evolve`).

A state is the set of removed layers per unit kind ({"block": ...} or {"attn": ..., "mlp": ...}), with a fixed
count per kind. A child takes 1-3 swap mutations (one removed layer of a kind swapped for a kept one, so counts
stay fixed; the number of swaps is the min of two uniform draws from 1..3, biased to 1). Fitness is KL(p_dense ||
q) per token on calibration text with the dense prefix replayed (`lensbench.calibration`). The starting
population holds the top-k of every drop ranking in the Profile plus random states.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from ...calibration import CalibrationKL
from ...capture import batches
from ...executor import ExecutorConfig, Workers
from ...errors import PlanError
from ...model import Model
from ...profiles import Profile
from ...units import Unit, normalise
from ..plan import Plan
from .budgets import unit_count
from .rankings import drop_order, names_for
from .registry import PolicyConfig, option, register
from .search import FitnessWork, Scored, SearchConfig, SearchResult, evolve

State = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class EvoConfig:
    """The depth search's knobs (the policy's options set the first three)."""

    generations: int = 30
    offspring: int = 8
    survivors: int = 2
    initial_random: int = 8
    seed: int = 0
    batch_size: int = 2  # texts per calibration minibatch
    seq_len: int = 128


@dataclass
class EvoResult:
    units: list[Unit]
    fitness: float
    seeds: dict[str, float]
    history: list[float]
    n_full: int
    n_mini: int
    n_tokens: int

    def record(self) -> dict:
        return {"calibration_kl_by_generation": self.history, "start_calibration_kl": self.seeds,
                "full_evaluations": self.n_full, "minibatch_evaluations": self.n_mini,
                "tokens_forwarded": self.n_tokens}


def units_of(state: State) -> list[Unit]:
    return normalise(Unit(i, kind) for kind, layers in state for i in layers)


def make_state(removed: dict[str, Sequence[int]]) -> State:
    return tuple(sorted((k, tuple(sorted(int(i) for i in v))) for k, v in removed.items()))


def seeds_from_profile(profile: Profile, counts: dict[str, int]) -> dict[str, State]:
    """The top-k of every drop ranking the profile holds for all the searched kinds."""
    out = {}
    for name in names_for("drop"):
        try:
            out[name] = make_state({k: drop_order(profile, name, k)[:n] for k, n in counts.items()})
        except PlanError:  # this profile lacks the ranking, or it does not score these kinds
            continue
    return out


def _mutate(state: State, L: int, rng: random.Random) -> State:
    removed = {k: set(v) for k, v in state}
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        kind = rng.choice(sorted(removed))
        kept = [i for i in range(L) if i not in removed[kind]]
        if not kept or not removed[kind]:
            continue
        removed[kind].remove(rng.choice(sorted(removed[kind])))
        removed[kind].add(rng.choice(kept))
    return make_state(removed)


class RemovedKL(FitnessWork):
    """The depth search's fitness: the calibration KL with a state's units removed (each worker runs the dense
    model on the calibration batches once, in `setup`)."""

    def __init__(self, texts: Sequence[str], batch_size: int, seq_len: int):
        self.texts, self.batch_size, self.seq_len = list(texts), batch_size, seq_len

    def setup(self, model: Model) -> None:
        self.fit = CalibrationKL(model, self.texts, self.batch_size, self.seq_len)

    def score(self, state, runs) -> float:
        return self.fit.removed(units_of(make_state(dict(state))), runs)


def evo_search(model: Model, texts: Sequence[str], counts: dict[str, int], seeds: dict[str, State],
               cfg: EvoConfig = EvoConfig(), progress: bool = False,
               executor: ExecutorConfig | None = None) -> EvoResult:
    """Search removed-unit sets with `counts` units per kind; returns the best state found. With an executor
    other than serial, each generation's candidates are scored at once on its workers."""
    if not texts:
        raise PlanError("the evolutionary search needs calibration texts")
    L = model.n_layers
    rng = random.Random(cfg.seed)
    population = dict(seeds)
    for j in range(cfg.initial_random):
        population[f"random{j}"] = make_state({k: rng.sample(range(L), n) for k, n in counts.items()})
    n_runs = len(list(batches(model, list(texts), cfg.batch_size, cfg.seq_len)))
    with Workers(RemovedKL(texts, cfg.batch_size, cfg.seq_len), model, executor) as workers:
        fit = Scored(lambda s: [[kind, list(layers)] for kind, layers in s], workers)
        found: SearchResult[State] = evolve(
            population, fit.full, fit.mini, lambda s, r: _mutate(s, L, r), list(range(n_runs)),
            SearchConfig(cfg.generations, cfg.offspring, cfg.survivors, cfg.seed), rng, progress, ahead=fit.ahead)
    return EvoResult(units_of(found.best), found.fitness,
                     {k: v for k, v in found.start.items() if not k.startswith("random")}, found.history,
                     fit.n_full, found.n_mini, fit.tokens)


@dataclass(frozen=True)
class EvoOptions(PolicyConfig):
    kind: str = option("block", "search over whole blocks, or attention and MLP sublayers", ("block", "sublayer"))
    generations: int = option(30, "generations of the search")
    offspring: int = option(8, "children per generation")
    seed: int = option(0, "random seed")


@register("evo", EvoOptions, needs_model=True, sweeps=True,
          budget="units to remove: a count, or a fraction below 1 (of blocks; of each sublayer kind for --kind "
                 "sublayer)",
          description="evolutionary search scored by KL to the dense model (EvoPress)")
def evo(profile: Profile, budget: float, cfg: EvoOptions, *, model, texts, progress, executor=None) -> Plan:
    L = int(profile.model["n_layers"])
    k = unit_count(budget, L, "blocks" if cfg.kind == "block" else "attention and MLP sublayers each",
                   limit=L - 1 if cfg.kind == "block" else None)
    counts = {"block": k} if cfg.kind == "block" else {"attn": k, "mlp": k}
    if cfg.kind == "sublayer" and not model.adapter.sublayer_drop:
        raise PlanError(f"{model.name} is post-norm: search over blocks (--kind block)")
    search = EvoConfig(generations=cfg.generations, offspring=cfg.offspring, seed=cfg.seed)
    result = evo_search(model, texts, counts, seeds_from_profile(profile, counts), search, progress=progress,
                        executor=executor)
    plan = Plan.drop(profile.model, result.units, predicted={"calibration_kl": result.fitness})
    plan.meta = {"search": result.record()}
    return plan
