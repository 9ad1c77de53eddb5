"""Agreement between rankings: Spearman correlation of every pair of per-layer importance scores in a
Profile (redundancy, ablation, geometry, skip effect, and whatever else ranks layers).

Scores are turned into importances first (negated where lower means more important), so a positive
ρ means two methods agree on which layers matter. Stored in the Profile as `ranking_agreement`
(axes ranking × ranking; the ranking names are in its params).
"""
from __future__ import annotations

import numpy as np

from .profiles import LayerScores, Profile
from .stats import spearman

NAME = "ranking_agreement"


def rankings(profile: Profile) -> dict[str, np.ndarray]:
    """Per-layer importances (higher = more important) of every ranking score in the profile."""
    L = int(profile.model.get("n_layers", 0))
    out = {}
    for name, s in profile.scores.items():
        if s.higher_is_more_important is None or s.axes != ("layer",) or s.values.shape != (L,):
            continue
        out[name] = s.values if s.higher_is_more_important else -s.values
    return out


def agreement(profile: Profile) -> LayerScores | None:
    """The Spearman matrix of all rankings, or None with fewer than two."""
    r = rankings(profile)
    if len(r) < 2:
        return None
    names = sorted(r)
    m = np.array([[spearman(r[a], r[b]) for b in names] for a in names])
    return LayerScores(NAME, m, None, ("ranking", "ranking"), "agreement", "Spearman rank correlation between the "
                       "layer importances of two rankings (positive = they agree)", {"rankings": names})


def refresh(profile: Profile) -> None:
    """Recompute the agreement matrix after scores were added or merged."""
    profile.scores.pop(NAME, None)
    a = agreement(profile)
    if a is not None:
        profile.add(a)
