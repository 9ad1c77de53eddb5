"""EvoPress-style evolutionary search for which units to remove (METHODS.md §8.3).

A state is the set of removed layers per unit kind ({"block": ...} or {"attn": ..., "mlp": ...}),
with a fixed count per kind. Each generation makes `offspring` children of the current parent by
1-3 swap mutations (one removed layer of a kind swapped for a kept one, so counts stay fixed; the
number of swaps is min of two uniform draws from 1..3, biased to 1). Selection is multi-step: the
children are scored on one calibration minibatch, the best `survivors` and the parent (elitist)
on all calibration text, and the best becomes the next parent. Fitness is KL(p_dense || q) per
token, computed with the dense prefix replayed (`lensbench.replay`). The starting population holds
the top-k of every ranking in the Profile plus random states, so the search never ends worse on
calibration text than the best ranking it started from.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import Sequence

from tqdm import tqdm

from .capture import batches
from .errors import PlanError
from .model import Model
from .plan import Unit, normalise
from .profile import Profile
from .replay import DenseRun, removed_states, token_scores

State = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class EvoConfig:
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
    history: list[float] = field(default_factory=list)
    n_full: int = 0
    n_mini: int = 0
    n_tokens: int = 0

    def record(self) -> dict:
        return {"calibration_kl_by_generation": self.history, "start_calibration_kl": self.seeds,
                "full_evaluations": self.n_full, "minibatch_evaluations": self.n_mini,
                "tokens_forwarded": self.n_tokens}


def units_of(state: State) -> list[Unit]:
    return normalise(Unit(i, kind) for kind, layers in state for i in layers)


def make_state(removed: dict[str, Sequence[int]]) -> State:
    return tuple(sorted((k, tuple(sorted(int(i) for i in v))) for k, v in removed.items()))


class Fitness:
    """Mean KL per token of a state on some calibration runs; full-set results are cached."""

    def __init__(self, model: Model, runs: list[DenseRun]):
        self.model, self.runs = model, runs
        self.cache: dict[State, float] = {}
        self.n_full = self.n_mini = self.n_tokens = 0

    def on(self, state: State, runs: list[DenseRun]) -> float:
        total, n = 0.0, 0
        for run in runs:
            kl, _ = token_scores(self.model, run, removed_states(self.model, run, units_of(state)))
            total += float(kl.sum())
            n += run.n_tokens
        self.n_tokens += n
        return total / n

    def full(self, state: State) -> float:
        if state not in self.cache:
            self.cache[state] = self.on(state, self.runs)
            self.n_full += 1
        return self.cache[state]

    def mini(self, state: State, run: DenseRun) -> float:
        self.n_mini += 1
        return self.on(state, [run])


def seeds_from_profile(profile: Profile, counts: dict[str, int]) -> dict[str, State]:
    """The top-k of every ranking the profile holds for all the searched kinds."""
    from .policies import RANKINGS, drop_order  # policies imports this module

    out = {}
    for name in RANKINGS:
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


def _random_state(counts: dict[str, int], L: int, rng: random.Random) -> State:
    return make_state({k: rng.sample(range(L), n) for k, n in counts.items()})


def evo_search(model: Model, texts: Sequence[str], counts: dict[str, int], seeds: dict[str, State],
               cfg: EvoConfig = EvoConfig(), progress: bool = False) -> EvoResult:
    """Search removed-unit sets with `counts` units per kind; returns the best state found."""
    if not texts:
        raise PlanError("the evolutionary search needs calibration texts")
    L = model.n_layers
    rng = random.Random(cfg.seed)
    runs = [DenseRun.from_batch(model, b) for b in batches(model, list(texts), cfg.batch_size, cfg.seq_len)]
    fit = Fitness(model, runs)
    population = dict(seeds)
    for j in range(cfg.initial_random):
        population[f"random{j}"] = _random_state(counts, L, rng)
    start = {name: fit.full(s) for name, s in population.items()}
    parent = min(population.values(), key=fit.full)
    history = [fit.full(parent)]
    bar = tqdm(range(cfg.generations), desc="evolutionary search", unit="gen", disable=not progress,
               file=sys.stderr, leave=False)
    for _ in bar:
        children: list[State] = []
        for _try in range(50 * cfg.offspring):
            if len(children) >= cfg.offspring:
                break
            child = _mutate(parent, L, rng)
            if child != parent and child not in children:
                children.append(child)
        mini = rng.choice(runs)
        scored = sorted(children, key=lambda c: fit.mini(c, mini))[:cfg.survivors]
        parent = min([*scored, parent], key=fit.full)
        history.append(fit.full(parent))
        bar.set_postfix(kl=f"{history[-1]:.4f}")
    return EvoResult(units_of(parent), history[-1], {k: v for k, v in start.items() if not k.startswith("random")},
                     history, fit.n_full, fit.n_mini, fit.n_tokens)
