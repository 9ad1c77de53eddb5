"""`kv-tuner`: KV-cache bits per layer by KVTuner's search (Li et al., ICML 2025, arXiv 2502.04420).

From the profile's `kv_sensitivity` (`kv_kl` [layer, pair]):
1. intra-layer pruning: a layer keeps only the (K bits, V bits) pairs on its Pareto front of (equivalent
   bits, KL), e.g. K4V8 goes wherever K8V4 costs the same bits and does less harm;
2. inter-layer grouping: layers with similar sensitivity (k-means on log KL over the pairs) form `groups`
   groups, and each group's candidates are the Pareto pairs of its summed KL;
3. a multi-objective search (optuna's NSGA-II, seeded with every uniform pair) over one pair per group,
   minimising (end-to-end KL on calibration text with every layer's cache packed, equivalent bits
   (K + V) / 2 averaged over layers), under the constraint bits <= budget.

The plan is the feasible point of the Pareto front with the lowest calibration KL; the whole front, the
groups and their candidates go into `plan.meta["kv_tuner"]`. KVTuner scores trials by GSM8K accuracy through
lm-eval; here the score is the calibration KL of `lensbench.kvmeasure` (prompt prefilled densely, the
continuation decoded against the packed cache), which needs no task data and is deterministic.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ...errors import PlanError
from ...kvcache import KVSpec
from ...kvmeasure import continuation_scores, prefill, windows
from ...profiles import Profile
from ...texts import bbc_news
from ..plan import KV, Plan
from .registry import PolicyConfig, option, register


@dataclass(frozen=True)
class KVTunerOptions(PolicyConfig):
    pairs: str = option("KV8,K8V4,K4V8,KV4,K8V2,K4V2,K2V4,KV2", "candidate (K, V) bit pairs, KVTuner's names")
    groups: int = option(6, "layer groups that share one pair")
    trials: int = option(100, "NSGA-II trials (end-to-end evaluations)")
    population: int = option(16, "NSGA-II population size")
    windows: int = option(4, "calibration windows the search scores each trial on")
    prompt_tokens: int = option(256, "prompt tokens of each calibration window (64 more are decoded against it)")
    seed: int = option(0, "random seed")


def _pairs(names: str, measured: list[str]) -> list[str]:
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    missing = [n for n in wanted if n not in measured]
    if missing or not wanted:
        raise PlanError(f"kv-tuner: pairs {', '.join(missing) or names!r} were not measured in the profile's "
                        f"kv_sensitivity ({', '.join(measured)}): choose among those, or profile with "
                        f"--param kv_sensitivity.pairs=...")
    return wanted


def bits_of(name: str) -> tuple[int, int]:
    if name.startswith("KV"):
        return int(name[2:]), int(name[2:])
    k, v = name[1:].split("V")
    return int(k), int(v)


def pareto(kl: np.ndarray, names: list[str]) -> list[str]:
    """The names whose (equivalent bits, KL) no other pair beats in both (ties in both keep the first)."""
    bits = [sum(bits_of(n)) / 2 for n in names]
    keep = []
    for a, n in enumerate(names):
        beaten = any((bits[b] <= bits[a] and kl[b] <= kl[a]) and (bits[b] < bits[a] or kl[b] < kl[a] or b < a)
                     for b in range(len(names)) if b != a)
        if not beaten:
            keep.append(n)
    return keep


def group_layers(kl: np.ndarray, k: int, seed: int) -> list[list[int]]:
    """Layers clustered by log-KL profile over the pairs (k-means, k-means++ start), ordered by first layer."""
    x = np.log10(np.clip(kl, 1e-7, None))
    k = max(1, min(k, len(x)))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    while len(centres) < k:
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[len(centres)])
    centres = np.array(centres)
    for _ in range(100):
        label = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), 1)
        new = np.array([x[label == j].mean(0) if (label == j).any() else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    groups = [sorted(np.flatnonzero(label == j).tolist()) for j in range(k)]
    return sorted((g for g in groups if g), key=lambda g: g[0])


@register("kv-tuner", KVTunerOptions, needs_model=True, budget="equivalent KV-cache bits per cached element, "
          "(K bits + V bits) / 2 averaged over layers",
          description="KV-cache bits per layer: Pareto-pruned pairs, layer groups, NSGA-II search (KVTuner)")
def kv_tuner(profile: Profile, budget: float, cfg: KVTunerOptions, *, model, texts, progress) -> Plan:
    import optuna  # heavy: optuna, only for the search

    if "kv_kl" not in profile.scores:
        raise PlanError("kv-tuner needs the kv_sensitivity scores: profile with --analyses kv_sensitivity")
    sens = profile.scores["kv_kl"]
    measured = list(sens.params["pair_names"])
    names = _pairs(cfg.pairs, measured)
    kl = sens.values[:, [measured.index(n) for n in names]]
    low, high = min(sum(bits_of(n)) / 2 for n in names), max(sum(bits_of(n)) / 2 for n in names)
    if not low - 1e-9 <= budget <= high + 1e-9:
        raise PlanError(f"kv-tuner budget {budget:g} bits is outside what the pairs allow ({low:g} to {high:g}): give "
                        f"a budget in that range")
    for what in ("groups", "trials", "population", "windows", "prompt_tokens"):
        if getattr(cfg, what) < 1:
            raise PlanError(f"kv-tuner: --{what.replace('_', '-')} must be at least 1")
    layout = {k: sens.params[k] for k in ("axis", "group", "window")}
    groups = group_layers(kl, cfg.groups, cfg.seed)
    candidates = [pareto(kl[g].sum(0), names) for g in groups]

    texts = list(texts) if texts else bbc_news("calibration")
    spans = windows(model, texts, cfg.prompt_tokens + 65, cfg.windows)
    pres = [prefill(model, ids, cfg.prompt_tokens) for ids in spans]
    L = model.n_layers

    def specs_of(choice: list[str]) -> dict[int, KVSpec]:
        return {i: KVSpec(*bits_of(name), **layout) for g, name in zip(groups, choice, strict=False) for i in g}

    def bits(choice: list[str]) -> float:
        return sum(len(g) * sum(bits_of(n)) / 2 for g, n in zip(groups, choice, strict=False)) / L

    measured_kl: dict[tuple, float] = {}

    def calibration_kl(choice: list[str]) -> float:
        key = tuple(choice)
        if key not in measured_kl:
            scores = [continuation_scores(model, pre, specs_of(choice)) for pre in pres]
            measured_kl[key] = sum(s["kl"] for s in scores) / sum(s["n"] for s in scores)
        return measured_kl[key]

    def objective(trial) -> tuple[float, float]:
        choice = [trial.suggest_categorical(f"group{j}", c) for j, c in enumerate(candidates)]
        trial.set_user_attr("bits", bits(choice))
        trial.set_constraint("bits_over_budget", bits(choice) - budget)
        return calibration_kl(choice), bits(choice)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=cfg.seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for name in names:  # every uniform pair each group can take: the baselines the search must beat
        if all(name in c for c in candidates):
            study.enqueue_trial({f"group{j}": name for j in range(len(groups))})
    rng = random.Random(cfg.seed)
    for _ in range(2):  # and two random mixes of the groups' candidates
        study.enqueue_trial({f"group{j}": rng.choice(c) for j, c in enumerate(candidates)})
    study.optimize(objective, n_trials=cfg.trials, show_progress_bar=progress)

    feasible = [t for t in study.trials if t.values is not None and t.user_attrs["bits"] <= budget + 1e-9]
    if not feasible:
        raise PlanError(f"kv-tuner found no allocation within {budget:g} bits in {cfg.trials} trials: raise --trials "
                        f"or the budget")
    best = min(feasible, key=lambda t: (t.values[0], t.values[1]))
    choice = [best.params[f"group{j}"] for j in range(len(groups))]
    front = sorted({(round(t.values[1], 6), t.values[0], tuple(t.params[f"group{j}"] for j in range(len(groups))))
                    for t in study.best_trials})
    attn = profile.model["units"]["attn"]
    pair_of = {i: name for g, name in zip(groups, choice, strict=False) for i in g}
    plan = Plan.drop(profile.model, [], predicted={"kv_bits": bits(choice), "calibration_kl": best.values[0]})
    plan.actions = {attn.format(i=i): KV(*bits_of(pair_of[i]), **layout) for i in range(L)}
    plan.meta = {"kv_tuner": {
        "groups": groups, "candidates": candidates, "trials": len(study.trials),
        "evaluations": len(measured_kl), "calibration": {"windows": len(pres), "prompt_tokens": cfg.prompt_tokens,
                                                         "decoded": 64},
        "pareto_front": [{"kv_bits": b, "calibration_kl": k, "pairs": list(c)} for b, k, c in front],
        "uniform": {n: {"kv_bits": sum(bits_of(n)) / 2, "calibration_kl": measured_kl[(n,) * len(groups)]}
                    for n in names if (n,) * len(groups) in measured_kl},
        "layout": layout}}
    return plan

