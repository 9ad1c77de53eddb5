"""The registry of checkpoint writers, and what every writer needs to know about a plan.

A writer is a function `(model, plan, staging: Path, dtype) -> record` registered under its format name;
it writes into an empty staging folder and returns what the folder's record adds (tensor types, bits).
"""
from __future__ import annotations

from typing import Callable

from ...errors import PlanError
from ..plan import Plan

FORMATS: dict[str, Callable] = {}


def register(name: str):
    """Register a writer under `name` (`lensbench compress --format NAME`)."""
    def deco(fn):
        FORMATS[name] = fn
        return fn
    return deco


def kept_layers(model, plan: Plan) -> list[int]:
    dropped = {u.layer for u in plan.resolve(model) if u.kind == "block"}
    return [i for i in range(model.n_layers) if i not in dropped]


def sublayer_units(model, plan: Plan) -> list:
    return [u for u in plan.resolve(model) if u.kind != "block"]


def refuse_sublayers(model, plan: Plan, fmt: str) -> None:
    units = sublayer_units(model, plan)
    if units:
        raise PlanError(f"the plan removes {', '.join(map(str, units))} (attention or MLP alone), which a {fmt} "
                        f"checkpoint cannot hold: save it with --format hf (lensbench's own layout), or drop whole "
                        f"blocks")
