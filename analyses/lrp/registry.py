"""The rule registry: one LRP rule per autograd node type, looked up by the node's name.

A rule says three things about one operation type:

- `saved(node)`: which of the forward inputs the node kept (index -> tensor). Those inputs are free;
  every other value a rule needs is rebuilt by a promise (`promises.py`).
- `forward(ctx, node, k)`: replays forward output `k` from the inputs (`ctx.input(node, i)`), so a
  promise can rebuild a value the graph did not save.
- `relevance(ctx, node, R)`: given the relevance of each forward output (`R[k]`, same shape as the
  output, or None), the relevance of each forward input (a list aligned with `node.next_functions`).
  Relevance a rule keeps (a bias, a constant operand, the softmax's normaliser) is reported with
  `ctx.absorb(category, amount)`, so the conservation report can account for every unit.

Names are autograd's (`MmBackward0`, `AddBackward0`, ...); a new operation is supported by
registering a rule under its name, without touching the engine:

    from lensbench.analyses.lrp import Rule, register_rule
    register_rule("MyOpBackward0", Rule(relevance=..., forward=..., doc="R_x = ..."))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lensbench.errors import LensbenchError


class LRPError(LensbenchError):
    """Relevance cannot be computed: an unsupported operation, a bad target, an output without a graph."""


@dataclass(frozen=True)
class Rule:
    relevance: Callable  # (ctx, node, R: list) -> list
    forward: Callable | None = None  # (ctx, node, k) -> Tensor | None
    saved: Callable | None = None  # node -> {input index: tensor}
    doc: str = ""


RULES: dict[str, Rule] = {}


def register_rule(names: str | tuple[str, ...], rule: Rule) -> Rule:
    """Register `rule` for one or more autograd node names (e.g. "MmBackward0")."""
    for name in (names,) if isinstance(names, str) else names:
        RULES[name] = rule
    return rule


def op_name(node) -> str:
    """The operation's autograd name, e.g. "MmBackward0" or "AccumulateGrad"."""
    return type(node).__name__


def rule_for(node) -> Rule | None:
    return RULES.get(type(node).__name__)


def unsupported(names) -> LRPError:
    names = sorted(set(names))
    return LRPError(f"no LRP rule for autograd operation(s) {', '.join(names)}: register one with "
                    f"lensbench.analyses.lrp.register_rule({names[0]!r}, Rule(relevance=...)) "
                    f"or pass strict=False to absorb their relevance and list them in the report")
