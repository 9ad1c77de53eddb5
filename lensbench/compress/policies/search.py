"""The EvoPress search loop (Sieberling et al., 2024, "EvoPress: Towards Optimal Dynamic Model Compression via
Evolutionary Search"), shared by the depth search (`evo`) and the bit-width search (`evo-bits`).

Each generation makes `offspring` distinct children of the current parent by mutation. Selection is
multi-step: the children are scored on one calibration minibatch, the best `survivors` and the parent
(elitist) on all calibration text, and the best becomes the next parent. The first parent is the best of a
starting population (rankings, baselines, random states), so the search never ends worse on calibration text
than the best state it started from.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from tqdm import tqdm

from ...errors import PlanError
from ...executor import Workers

S = TypeVar("S")


class FitnessWork:
    """A search's fitness as work items, [payload, minibatch index or None] -> {"kl", "tokens"}: `setup` sets
    `self.fit` (an evaluator with calibration `runs` and a running `n_tokens`, built once per worker) and
    `score(payload, runs)` scores one state on those runs (None: all of them)."""

    fit: Any

    def score(self, payload, runs) -> float:
        raise NotImplementedError

    def run(self, item) -> dict:
        payload, run = item
        before = self.fit.n_tokens
        kl = self.score(payload, None if run is None else [self.fit.runs[run]])
        return {"kl": kl, "tokens": self.fit.n_tokens - before}


class Scored:
    """A search's fitness on calibration text, cached per (state, minibatch): `full` and `mini` for `evolve`,
    and `ahead`, which scores a set of states at once on `workers` (an executor's, or this process as the serial
    one). `payload(state)` is the JSON that names a state to the workers' `Work`, whose `run([payload, run])`
    returns {"kl": the fitness (run None: on all text), "tokens": the tokens it forwarded}."""

    def __init__(self, payload: Callable[[S], Any], workers: Workers):
        self.payload, self.workers = payload, workers
        self.cache: dict[tuple[str, int | None], float] = {}
        self.tokens = 0

    def _key(self, state: S, run: int | None) -> tuple[str, int | None]:
        return json.dumps(self.payload(state)), run

    def ahead(self, states: Sequence[S], run: int | None) -> None:
        todo = list(dict.fromkeys(k for k in (self._key(s, run) for s in states) if k not in self.cache))
        results = self.workers.map([[json.loads(key), r] for key, r in todo])
        for key, result in zip(todo, results, strict=True):
            self.cache[key] = result["kl"]
            self.tokens += result["tokens"]

    def full(self, state: S) -> float:
        return self.mini(state, None)

    def mini(self, state: S, run: int | None) -> float:
        key = self._key(state, run)
        if key not in self.cache:
            self.ahead([state], run)
        return self.cache[key]

    @property
    def n_full(self) -> int:
        """States scored on all calibration text."""
        return sum(1 for _, run in self.cache if run is None)


@dataclass(frozen=True)
class SearchConfig:
    generations: int = 30
    offspring: int = 8
    survivors: int = 2  # children promoted from the minibatch to the full calibration set each generation
    seed: int = 0


@dataclass
class SearchResult(Generic[S]):
    best: S
    fitness: float
    start: dict[str, float]  # the starting population's fitness by name
    history: list[float] = field(default_factory=list)  # the parent's fitness after each generation
    n_mini: int = 0  # minibatch evaluations


def evolve(population: dict[str, S], full: Callable[[S], float], mini: Callable[[S, object], float],
           mutate: Callable[[S, random.Random], S | None], runs: Sequence, cfg: SearchConfig, rng: random.Random,
           progress: bool = False, desc: str = "evolutionary search",
           ahead: Callable[[list[S], object], None] | None = None) -> SearchResult[S]:
    """Evolve from `population` (name -> state). `full(state)` is the fitness on all calibration text (lower is
    better; callers cache it), `mini(state, run)` on one minibatch of `runs`, `mutate(parent, rng)` a child or
    None when no valid child was made. `ahead(states, run)`, when given, is told every set of states about to
    be scored together (run None: on all text) so it can score them at once on workers and cache the results
    that `full` and `mini` then return; the search itself is the same."""
    if not population:
        raise PlanError("the search has no starting state that fits the budget: give a larger budget")
    ahead = ahead or (lambda states, run: None)
    ahead(list(population.values()), None)
    start = {name: full(s) for name, s in population.items()}
    parent = min(population.values(), key=full)
    history = [full(parent)]
    n_mini = 0
    bar = tqdm(range(cfg.generations), desc=desc, unit="gen", disable=not progress, file=sys.stderr, leave=False)
    for _ in bar:
        children: list[S] = []
        for _try in range(50 * cfg.offspring):
            if len(children) >= cfg.offspring:
                break
            child = mutate(parent, rng)
            if child is not None and child != parent and child not in children:
                children.append(child)
        run = rng.choice(runs)
        n_mini += len(children)
        ahead(children, run)
        scored = sorted(children, key=lambda c: mini(c, run))[:cfg.survivors]
        ahead([*scored, parent], None)
        parent = min([*scored, parent], key=full)
        history.append(full(parent))
        bar.set_postfix(kl=f"{history[-1]:.4f}")
    return SearchResult(parent, history[-1], start, history, n_mini)
