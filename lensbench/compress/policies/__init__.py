"""Policies turn a Profile (and, for searches, the model) into a Plan under a budget.

    plan = make_plan("drop-attn", profile, 0.25, ranking="ablation")
    plan = make_plan("evo", profile, 8, model=model, texts=texts, kind="sublayer")
    plan = make_plan("bits-dp", profile, 3.5, config=BitsDpOptions(unit="linear"))

Each policy is registered with its options dataclass and what its budget means (`registry`), so the CLI
builds its flags and help from them and every budget that cannot be met is refused before work starts.

    drop.py       drop-block, drop-attn, drop-mlp, drop-joint, balanced-skip, ranking-skip
    iterative.py  the iterative variant of the drop policies (re-scored each round)
    evo.py        evo: which units to remove, by evolutionary search
    bits.py       bits-rank, bits-dp, bits-bisect: bit-widths under an average-bits budget
    baq.py        bits-baq: bit-widths across each linear's input groups (BAQ)
    evo_bits.py   evo-bits: bit-widths by evolutionary search
    kv_tuner.py   kv-tuner: KV-cache bits per layer (KVTuner: pruning, grouping, NSGA-II)
    rankings.py   the rankings every policy reads from a Profile (one table)
    budgets.py    budget and level checks;  search.py  the EvoPress loop both searches use

A new policy is a module that defines an options dataclass and a function registered with `@register`,
imported below.
"""
from __future__ import annotations

from . import drop, evo, bits, baq, evo_bits, kv_tuner  # noqa: F401,I001  (each module registers its policies, in this order)
from .baq import BitsBaqOptions
from .bits import BitsBisectOptions, BitsDpOptions, BitsRankOptions
from .drop import BalancedSkipOptions, DropOptions, RankingSkipOptions
from .evo import EvoOptions
from .evo_bits import EvoBitsOptions
from .kv_tuner import KVTunerOptions
from .rankings import RANKINGS
from .registry import POLICIES, Policy, PolicyConfig, make_plan, option, plan, register

__all__ = ["POLICIES", "RANKINGS", "BalancedSkipOptions", "BitsBaqOptions", "BitsBisectOptions", "BitsDpOptions",
           "BitsRankOptions", "DropOptions", "EvoBitsOptions", "EvoOptions", "KVTunerOptions", "Policy", "PolicyConfig",
           "RankingSkipOptions", "make_plan", "option", "plan", "register"]
