"""Policies turn a Profile (and, for searches, the model) into a Plan under a budget.

    plan = make_plan("drop-attn", profile, 0.25, ranking="ablation")
    plan = make_plan("evo", profile, 8, model=model, texts=texts, kind="sublayer")

Each policy is registered with what its budget means, so the CLI can explain it and every
budget that cannot be met is refused before work starts:

* `drop-block`, `drop-attn`, `drop-mlp`, `drop-joint` (LLM-Drop / ShortGPT, METHODS.md §4, §9):
  budget = units to remove, a count (>= 1) or a fraction of the candidates (< 1). The least
  important units by a ranking go first; `iterative=True` removes one unit at a time and
  re-scores the rest on the already-reduced model (needs the model and calibration texts).
* `balanced-skip` (Unified Layer Skipping, §8.5): budget = target speed-up r; keeps round(L/r)
  evenly spaced layers, always the first and the last. Input-independent; needs no ranking.
* `ranking-skip`: the same number of skipped layers as `balanced-skip`, chosen by a ranking.
* `evo` (EvoPress, §8.3; `lensbench.evo`): budget = units to remove; an evolutionary search scored
  end to end by KL to the dense model on calibration text, started from the rankings.

Rankings are read from the Profile by name: `redundancy`, `ablation`, `geometry`, `skip`,
`random`, or `score:<name>` for any per-layer score with a direction. New rankings register in
`RANKINGS`, new policies with `@register`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import PlanError
from .plan import Plan, Unit, normalise
from .profile import Profile

# ranking name -> {unit kind: score name in the Profile}
RANKINGS: dict[str, dict[str, str]] = {
    "redundancy": {"block": "block_cosine", "attn": "attn_cosine", "mlp": "mlp_cosine"},
    "ablation": {"block": "ablation_kl_block", "attn": "ablation_kl_attn", "mlp": "ablation_kl_mlp"},
    "geometry": {"block": "geometry_error"},
    "skip": {"block": "skip_output_effect"},
}
ANALYSIS_OF = {"redundancy": "redundancy", "ablation": "ablation", "geometry": "geometry", "skip": "skip_effect"}


@dataclass(frozen=True)
class Policy:
    name: str
    fn: Callable[..., Plan]
    budget: str
    description: str
    needs_model: bool = False


POLICIES: dict[str, Policy] = {}


def register(name: str, budget: str, description: str, needs_model: bool = False):
    def deco(fn):
        POLICIES[name] = Policy(name, fn, budget, description, needs_model)
        return fn
    return deco


def make_plan(name: str, profile: Profile, budget: float, *, model=None, texts: Sequence[str] | None = None,
              **options) -> Plan:
    """The Plan that policy `name` makes from `profile` under `budget` (see the module docstring)."""
    if name not in POLICIES:
        raise PlanError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
    policy = POLICIES[name]
    if isinstance(texts, str):  # one calibration text, never one text per character
        texts = [texts]
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise PlanError(f"budget {budget!r} is not a number: {policy.budget}") from None
    accepted = options_of(policy.fn)
    unknown = sorted(k for k, v in options.items() if k not in accepted and k != "progress" and v is not None)
    if unknown:
        raise PlanError(f"policy {name!r} does not take {', '.join('--' + k.replace('_', '-') for k in unknown)}; "
                        f"it takes {', '.join('--' + k.replace('_', '-') for k in sorted(accepted)) or 'no options'}")
    options = {k: v for k, v in options.items() if k in accepted}
    needs = policy.needs_model or options.get("iterative")
    if needs and model is None:
        raise PlanError(f"policy {name!r}{' (iterative)' if options.get('iterative') else ''} runs the model: "
                        f"give the model (lensbench plan ... --model SOURCE)")
    if model is not None:
        profile.check_model(model)
    plan = policy.fn(profile, budget, model=model, texts=texts, **options)
    plan.policy = {"name": name, "budget": budget,
                   **{k: v for k, v in options.items() if v is not None and k != "progress"}}
    return plan


def options_of(fn: Callable[..., Plan]) -> set[str]:
    """The options a policy takes: its keyword-only parameters besides the model and the texts."""
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("model", "texts")}


# --- rankings ---------------------------------------------------------------------------------------

def drop_order(profile: Profile, ranking: str, kind: str, seed: int = 0) -> list[int]:
    """Layers in the order a policy removes them (least important first) for one unit kind."""
    L = int(profile.model["n_layers"])
    if ranking == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(L)]
    scores = _ranking_scores(profile, ranking, kind)
    return scores.ranking()[::-1]


def _ranking_scores(profile: Profile, ranking: str, kind: str):
    if ranking.startswith("score:"):
        name = ranking[len("score:"):]
    else:
        if ranking not in RANKINGS:
            raise PlanError(f"unknown ranking {ranking!r}: use one of {', '.join([*RANKINGS, 'random'])} "
                            f"or score:<name>")
        if kind not in RANKINGS[ranking]:
            raise PlanError(f"ranking {ranking!r} scores whole layers only, not {kind} sublayers: use ranking "
                            f"redundancy or ablation")
        name = RANKINGS[ranking][kind]
    if name not in profile.scores:
        hint = (f"run lensbench profile MODEL --analyses {ANALYSIS_OF[ranking]} --out DIR"
                if ranking in ANALYSIS_OF else f"this profile has {', '.join(profile.scores)}")
        raise PlanError(f"the profile has no {name!r} scores for ranking {ranking!r}: {hint}")
    s = profile.scores[name]
    if s.higher_is_more_important is None or s.values.ndim != 1:
        raise PlanError(f"score {name!r} is descriptive (no importance direction): choose a ranking score")
    missing = [int(i) for i in np.flatnonzero(~np.isfinite(s.values))]
    if missing:  # a ranking with holes would silently keep or drop those layers
        raise PlanError(f"score {name!r} has no value for layer(s) {missing}: re-run the analysis that makes it "
                        f"({s.analysis or 'see lensbench models'}) or choose another ranking")
    return s


# --- budgets ----------------------------------------------------------------------------------------

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


# --- policies ---------------------------------------------------------------------------------------

def _topk(kind: str):
    def policy(profile: Profile, budget: float, *, model=None, texts=None, ranking: str = "redundancy",
               iterative: bool = False, seed: int = 0) -> Plan:
        L = int(profile.model["n_layers"])
        kinds = ["attn", "mlp"] if kind == "joint" else [kind]
        what = {"block": "blocks", "attn": "attention sublayers", "mlp": "MLP sublayers",
                "joint": "attention/MLP sublayers"}[kind]
        k = unit_count(budget, L * len(kinds), what, limit=L - 1 if kind == "block" else None)
        if iterative:
            from .iterative import iterative_drop

            units, trail = iterative_drop(model, texts, kinds, k, ranking)
            return Plan.drop(profile.model, units, predicted={"rounds": trail})
        candidates = _ordered_candidates(profile, ranking, kinds, seed)
        units = [u for _, u in candidates[:k]]
        if kind == "joint" and sum(u.kind == "block" for u in normalise(units)) >= L:
            raise PlanError(f"budget {budget} removes every layer's attention and MLP: give a smaller budget")
        return Plan.drop(profile.model, units, predicted={"score_sum": float(sum(s for s, _ in candidates[:k]))})
    return policy


def _ordered_candidates(profile: Profile, ranking: str, kinds: list[str], seed: int) -> list[tuple[float, Unit]]:
    """(score, unit) least important first, across `kinds` (joint drop compares scores across kinds)."""
    if ranking == "random":
        rng = np.random.default_rng(seed)
        units = [Unit(i, k) for k in kinds for i in range(int(profile.model["n_layers"]))]
        return [(float("nan"), units[j]) for j in rng.permutation(len(units))]
    out = []
    for k in kinds:
        s = _ranking_scores(profile, ranking, k)
        out += [((v if s.higher_is_more_important else -v), Unit(i, k)) for i, v in enumerate(s.values)]
    return sorted(out, key=lambda t: (np.nan_to_num(t[0], nan=np.inf), t[1]))


for _kind, _desc in (("block", "whole blocks"), ("attn", "attention sublayers"), ("mlp", "MLP sublayers"),
                     ("joint", "attention and MLP sublayers, ranked together")):
    register(f"drop-{_kind}", "units to remove: a count, or a fraction of the candidates below 1",
             f"remove the least important {_desc} by a ranking (one-shot, or --iterative)")(_topk(_kind))


@register("balanced-skip", "target speed-up r > 1 (keeps round(L/r) layers)",
          "skip evenly spaced middle layers, always keeping the first and the last (Unified Layer Skipping)")
def balanced_skip(profile: Profile, budget: float, **_) -> Plan:
    L = int(profile.model["n_layers"])
    keep = kept_for_speedup(budget, L, minimum=2)
    kept = set(np.round(np.linspace(0, L - 1, keep)).astype(int).tolist())
    return Plan.drop(profile.model, [Unit(i, "block") for i in range(L) if i not in kept],
                     predicted={"layer_speedup": L / keep})


@register("ranking-skip", "target speed-up r > 1 (keeps round(L/r) layers)",
          "skip the layers a ranking finds least important, as many as balanced-skip would")
def ranking_skip(profile: Profile, budget: float, *, ranking: str = "ablation", seed: int = 0, **_) -> Plan:
    L = int(profile.model["n_layers"])
    keep = kept_for_speedup(budget, L, minimum=1)
    order = drop_order(profile, ranking, "block", seed)
    return Plan.drop(profile.model, [Unit(i, "block") for i in order[:L - keep]],
                     predicted={"layer_speedup": L / keep})


@register("evo", "units to remove: a count, or a fraction below 1 (of blocks; of each sublayer kind for "
          "--kind sublayer)", "evolutionary search scored by KL to the dense model (EvoPress)", needs_model=True)
def evo(profile: Profile, budget: float, *, model=None, texts=None, kind: str = "block", generations: int = 30,
        offspring: int = 8, seed: int = 0, progress: bool = False, **_) -> Plan:
    from .evo import EvoConfig, evo_search, seeds_from_profile

    if kind not in ("block", "sublayer"):
        raise PlanError(f"evo searches over 'block' or 'sublayer' units, not {kind!r}")
    L = int(profile.model["n_layers"])
    k = unit_count(budget, L, "blocks" if kind == "block" else "attention and MLP sublayers each",
                   limit=L - 1 if kind == "block" else None)
    counts = {"block": k} if kind == "block" else {"attn": k, "mlp": k}
    if kind == "sublayer" and not model.adapter.sublayer_drop:
        raise PlanError(f"{model.name} is post-norm: search over blocks (--kind block)")
    cfg = EvoConfig(generations=generations, offspring=offspring, seed=seed)
    result = evo_search(model, texts, counts, seeds_from_profile(profile, counts), cfg, progress=progress)
    plan = Plan.drop(profile.model, result.units, predicted={"calibration_kl": result.fitness})
    plan.meta = {"search": result.record()}
    return plan


from . import bitalloc  # noqa: E402,F401  (registers the bit-allocation policies)
