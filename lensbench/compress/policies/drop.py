"""Drop and skip policies.

* `drop-block`, `drop-attn`, `drop-mlp`, `drop-joint` (LLM-Drop: He et al., 2024, "What Matters in Transformers?
  Not All Attention is Needed"; ShortGPT: Men et al., 2024): budget = units to remove, a count (>= 1) or a
  fraction of the candidates (< 1). The least important units by a ranking go first; `iterative` removes one
  unit at a time and re-scores the rest on the already-reduced model (needs the model and calibration texts).
* `balanced-skip` (Unified Layer Skipping: Liu et al., 2024): budget = target speed-up r; keeps round(L/r)
  evenly spaced layers, always the first and the last. Input-independent; needs no ranking.
* `ranking-skip`: the same number of skipped layers as `balanced-skip`, chosen by a ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import PlanError
from ...profiles import Profile
from ...units import Unit, normalise
from ..plan import Plan
from .budgets import kept_for_speedup, unit_count
from .iterative import iterative_drop
from .rankings import drop_order, ordered_candidates
from .registry import PolicyConfig, option, register

_RANKING_HELP = "redundancy, ablation, geometry, skip, random or score:NAME"


@dataclass(frozen=True)
class DropOptions(PolicyConfig):
    ranking: str = option("redundancy", f"which units matter least: {_RANKING_HELP}")
    iterative: bool = option(False, "drop one unit per round and re-score the rest (runs the model)")
    seed: int = option(0, "random seed (ranking random)")


def _topk(kind: str):
    def policy(profile: Profile, budget: float, cfg: DropOptions, *, model, texts, progress) -> Plan:
        L = int(profile.model["n_layers"])
        kinds = ["attn", "mlp"] if kind == "joint" else [kind]
        what = {"block": "blocks", "attn": "attention sublayers", "mlp": "MLP sublayers",
                "joint": "attention/MLP sublayers"}[kind]
        k = unit_count(budget, L * len(kinds), what, limit=L - 1 if kind == "block" else None)
        if cfg.iterative:
            units, trail = iterative_drop(model, texts, kinds, k, cfg.ranking)
            return Plan.drop(profile.model, units, predicted={"rounds": trail})
        candidates = ordered_candidates(profile, cfg.ranking, kinds, cfg.seed)
        units = [u for _, u in candidates[:k]]
        if kind == "joint" and sum(u.kind == "block" for u in normalise(units)) >= L:
            raise PlanError(f"budget {budget} removes every layer's attention and MLP: give a smaller budget")
        return Plan.drop(profile.model, units, predicted={"score_sum": float(sum(s for s, _ in candidates[:k]))})
    return policy


for _kind, _desc in (("block", "whole blocks"), ("attn", "attention sublayers"), ("mlp", "MLP sublayers"),
                     ("joint", "attention and MLP sublayers, ranked together")):
    register(f"drop-{_kind}", DropOptions, needs_model=lambda profile, cfg: cfg.iterative,
             budget="units to remove: a count, or a fraction of the candidates below 1",
             description=f"remove the least important {_desc} by a ranking (one-shot, or --iterative)")(_topk(_kind))


@dataclass(frozen=True)
class BalancedSkipOptions(PolicyConfig):
    pass


@register("balanced-skip", BalancedSkipOptions, budget="target speed-up r > 1 (keeps round(L/r) layers)",
          description="skip evenly spaced middle layers, always keeping the first and the last (Unified Layer "
                      "Skipping)")
def balanced_skip(profile: Profile, budget: float, cfg: BalancedSkipOptions, *, model, texts, progress) -> Plan:
    L = int(profile.model["n_layers"])
    keep = kept_for_speedup(budget, L, minimum=2)
    kept = set(np.round(np.linspace(0, L - 1, keep)).astype(int).tolist())
    return Plan.drop(profile.model, [Unit(i, "block") for i in range(L) if i not in kept],
                     predicted={"layer_speedup": L / keep})


@dataclass(frozen=True)
class RankingSkipOptions(PolicyConfig):
    ranking: str = option("ablation", f"which layers matter least: {_RANKING_HELP}")
    seed: int = option(0, "random seed (ranking random)")


@register("ranking-skip", RankingSkipOptions, budget="target speed-up r > 1 (keeps round(L/r) layers)",
          description="skip the layers a ranking finds least important, as many as balanced-skip would")
def ranking_skip(profile: Profile, budget: float, cfg: RankingSkipOptions, *, model, texts, progress) -> Plan:
    L = int(profile.model["n_layers"])
    keep = kept_for_speedup(budget, L, minimum=1)
    order = drop_order(profile, cfg.ranking, "block", cfg.seed)
    return Plan.drop(profile.model, [Unit(i, "block") for i in order[:L - keep]],
                     predicted={"layer_speedup": L / keep})
