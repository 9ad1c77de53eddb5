"""The EvoPress search loop (Sieberling et al., 2024, "EvoPress: Towards Optimal Dynamic Model Compression via
Evolutionary Search"), shared by the depth search (`evo`) and the bit-width search (`evo-bits`).

Each generation makes `offspring` distinct children of the current parent by mutation. Selection is
multi-step: the children are scored on one calibration minibatch, the best `survivors` and the parent
(elitist) on all calibration text, and the best becomes the next parent. The first parent is the best of a
starting population (rankings, baselines, random states), so the search never ends worse on calibration text
than the best state it started from.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from tqdm import tqdm

from ...errors import PlanError

S = TypeVar("S")


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
           progress: bool = False, desc: str = "evolutionary search") -> SearchResult[S]:
    """Evolve from `population` (name -> state). `full(state)` is the fitness on all calibration text (lower is
    better; callers cache it), `mini(state, run)` on one minibatch of `runs`, `mutate(parent, rng)` a child or
    None when no valid child was made."""
    if not population:
        raise PlanError("the search has no starting state that fits the budget: give a larger budget")
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
        scored = sorted(children, key=lambda c: mini(c, run))[:cfg.survivors]
        parent = min([*scored, parent], key=full)
        history.append(full(parent))
        bar.set_postfix(kl=f"{history[-1]:.4f}")
    return SearchResult(parent, history[-1], start, history, n_mini)
