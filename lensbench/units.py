"""Removable units of a transformer and the names they have in a model.

A unit is a whole block, or its attention ("attn") or MLP ("mlp") sublayer. Profiles record the name
templates of a model's units (`templates_of`), plans name units by those names, and surgery removes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .errors import PlanError

KINDS = ("block", "attn", "mlp")


@dataclass(frozen=True, order=True)
class Unit:
    """A removable unit: block `layer`, or its attention ("attn") or MLP ("mlp") sublayer."""

    layer: int
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}{self.layer}"


def templates_of(adapter) -> dict[str, str]:
    """`{"block": "model.layers.{i}", "attn": ..., "mlp": ...}`: the module names of a model's units."""
    block = adapter.block_path(0)[:-1] + "{i}"
    return {"block": block, "attn": f"{block}.{adapter.attn}", "mlp": f"{block}.{adapter.mlp}"}


def unit_templates(card: dict) -> dict[str, str]:
    """The unit name templates a model card (`Profile.model`) recorded."""
    if "units" not in card:
        raise PlanError(f"the profile of {card.get('name')!r} does not name its layers (made by an older "
                        f"lensbench): re-run lensbench profile")
    return card["units"]


def normalise(units: Iterable[Unit]) -> list[Unit]:
    """Sorted, at most one unit per layer: a layer whose attention and MLP are both removed, or whose
    block is removed, is one removed block."""
    units = set(units)
    blocks = {u.layer for u in units if u.kind == "block"}
    attn = {u.layer for u in units if u.kind == "attn"} - blocks
    mlp = {u.layer for u in units if u.kind == "mlp"} - blocks
    blocks |= attn & mlp
    return sorted([Unit(i, "block") for i in blocks] + [Unit(i, "attn") for i in attn - blocks]
                  + [Unit(i, "mlp") for i in mlp - blocks])


def is_conv1d(module) -> bool:
    """GPT-2-style `Conv1D`: a linear layer with its weight stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
