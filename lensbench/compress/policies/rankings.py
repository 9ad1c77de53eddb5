"""Rankings: which units matter least, read from a Profile's scores. One table for every policy.

A ranking names a score per unit kind (`block`, `attn`, `mlp`) and the analysis that makes it. Drop and skip
policies take the drop rankings; bit policies take the block rankings marked for them, plus `quant` (the
measured KL of a block quantised to the low level). A bit ranking's score name may hold `{bits}`: the low level
it ranks at (the GPTQ database's scores, `lensbench quant-db`). Every policy also takes `random` (seeded) and
`score:NAME` (any per-layer score with an importance direction). A new ranking is one row here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import PlanError
from ...profiles import LayerScores, Profile
from ...units import Unit


@dataclass(frozen=True)
class Ranking:
    scores: dict[str, str]  # unit kind -> score name in the Profile
    analysis: str  # the analysis that makes the scores (`lensbench profile --analyses NAME`, or quant-db)
    used_by: tuple[str, ...] = ("drop",)  # "drop": drop/skip policies and EvoPress seeds; "bits": bit policies


RANKINGS: dict[str, Ranking] = {
    "redundancy": Ranking({"block": "block_cosine", "attn": "attn_cosine", "mlp": "mlp_cosine"}, "redundancy"),
    "ablation": Ranking({"block": "ablation_kl_block", "attn": "ablation_kl_attn", "mlp": "ablation_kl_mlp"},
                        "ablation"),
    "geometry": Ranking({"block": "geometry_error"}, "geometry"),
    "skip": Ranking({"block": "skip_output_effect"}, "skip_effect"),
    "lim": Ranking({"block": "block_cosine"}, "redundancy", ("bits",)),  # LayerwiseQuant's LIM: the block cosine
    "zd": Ranking({"block": "zd"}, "weight_outliers", ("bits",)),  # LayerwiseQuant's z-score distribution
    # from a GPTQ database (`compress.database`), at the low level: EvoPress's normalised layer error, HAWQ's
    # trace score, the augmented score (Hessian term + end-to-end KL), and the measured KL at GPTQ's level
    "hessian": Ranking({"block": "gptq_nmse_block_int{bits}"}, "quant-db", ("bits",)),
    "hawq": Ranking({"block": "hawq_block_int{bits}"}, "quant-db", ("bits",)),
    "augmented": Ranking({"block": "augmented_block_int{bits}"}, "quant-db", ("bits",)),
    "gptq-kl": Ranking({"block": "gptq_kl_block_int{bits}"}, "quant-db", ("bits",)),
}


def names_for(use: str) -> list[str]:
    return [n for n, r in RANKINGS.items() if use in r.used_by]


def ranking_scores(profile: Profile, ranking: str, kind: str, use: str = "drop", bits: int | None = None
                   ) -> LayerScores:
    """The Profile's scores behind `ranking` for units of `kind` (at level `bits` for a per-level bit ranking),
    checked to be usable as a ranking."""
    if ranking.startswith("score:"):
        name = ranking[len("score:"):]
    else:
        if ranking not in RANKINGS or use not in RANKINGS[ranking].used_by:
            extra = ["quant"] if use == "bits" else []
            raise PlanError(f"unknown ranking {ranking!r}{' for bit allocation' if use == 'bits' else ''}: use one "
                            f"of {', '.join([*names_for(use), *extra, 'random'])} or score:<name>")
        if kind not in RANKINGS[ranking].scores:
            raise PlanError(f"ranking {ranking!r} scores whole layers only, not {kind} sublayers: use ranking "
                            f"redundancy or ablation")
        name = RANKINGS[ranking].scores[kind].format(bits=bits)
    if name not in profile.scores:
        analysis = RANKINGS[ranking].analysis if ranking in RANKINGS else None
        hint = ("build a GPTQ database with lensbench quant-db MODEL --out DB (its levels including the low one) "
                "and plan with --database DB --method gptq" if analysis == "quant-db" else
                f"run lensbench profile MODEL --analyses {analysis} --out DIR" if analysis
                else f"this profile has {', '.join(profile.scores)}")
        raise PlanError(f"the profile has no {name!r} scores for ranking {ranking!r}: {hint}")
    s = profile.scores[name]
    if s.higher_is_more_important is None or s.values.ndim != 1:
        raise PlanError(f"score {name!r} is descriptive (no importance direction): choose a ranking score")
    missing = [int(i) for i in np.flatnonzero(~np.isfinite(s.values))]
    if missing:  # a ranking with holes would silently keep or drop those layers
        raise PlanError(f"score {name!r} has no value for layer(s) {missing}: re-run the analysis that makes it "
                        f"({s.analysis or 'see lensbench models'}) or choose another ranking")
    return s


def drop_order(profile: Profile, ranking: str, kind: str, seed: int = 0) -> list[int]:
    """Layers in the order a policy removes them (least important first) for one unit kind."""
    L = int(profile.model["n_layers"])
    if ranking == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(L)]
    return ranking_scores(profile, ranking, kind).ranking()[::-1]


def ordered_candidates(profile: Profile, ranking: str, kinds: list[str], seed: int) -> list[tuple[float, Unit]]:
    """(score, unit) least important first, across `kinds` (joint drop compares scores across kinds)."""
    if ranking == "random":
        rng = np.random.default_rng(seed)
        units = [Unit(i, k) for k in kinds for i in range(int(profile.model["n_layers"]))]
        return [(float("nan"), units[j]) for j in rng.permutation(len(units))]
    out = []
    for k in kinds:
        s = ranking_scores(profile, ranking, k)
        out += [((v if s.higher_is_more_important else -v), Unit(i, k)) for i, v in enumerate(s.values)]
    return sorted(out, key=lambda t: (np.nan_to_num(t[0], nan=np.inf), t[1]))


def sensitivity(profile: Profile, bits: int, unit: str = "block", error: str = "kl",
                database: bool = False) -> LayerScores:
    """Each block's (or each block's linears') error at `bits`: the measured KL (quant_sensitivity's, rounded to
    nearest; a GPTQ database's per block) or, from a database, the normalised layer error (`error="nmse"`)."""
    if database or error == "nmse":
        if not database:
            raise PlanError("the nmse error comes from a GPTQ database: give --database DB --method gptq (built "
                            "with lensbench quant-db), or use --error kl")
        name = f"gptq_{error}_{unit}_int{bits}"
        if name not in profile.scores:
            raise PlanError(f"the GPTQ database has no {name!r}" + (
                ": it measures the KL per block; use --error nmse per linear" if unit == "linear" else
                ": it was built without the KL (--kl-texts 0); use --error nmse or rebuild it"))
        return profile.scores[name]
    name = f"quant_kl_{unit}_int{bits}"
    if name not in profile.scores:
        raise PlanError(f"the profile has no {name!r}: run lensbench profile MODEL --analyses quant_sensitivity "
                        f"(with bits including {bits}{' and per_linear' if unit == 'linear' else ''})")
    return profile.scores[name]


def block_order(profile: Profile, ranking: str, lo: int, seed: int = 0) -> list[int]:
    """Blocks least important first by a bit-allocation ranking (`quant`: the measured KL at level `lo`)."""
    L = int(profile.model["n_layers"])
    if ranking == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(L)]
    scores = sensitivity(profile, lo) if ranking == "quant" else ranking_scores(profile, ranking, "block", "bits",
                                                                                 lo)
    return scores.ranking()[::-1]
