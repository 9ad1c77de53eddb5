"""Promises: the forward values a rule needs but autograd did not save, rebuilt on demand.

The LRP rules need forward values (the operands of an Add, the input of a Mean ...). Autograd keeps
only what the backward pass needs, so many are missing. DynamicLRP's answer (Lee & Arias 2025,
§3.3) is a *promise*: the request walks down the graph to the nearest node whose own saved tensors
give its output (an "arg node"), then replays the forward chain back up to the value it was asked
for. Here a promise is `Values.get(node, k)`:

1. a value some consumer saved as its input (an Mm's `self`, a Mul's `other`, a Pow's base) is
   taken as is — those are the arg nodes, collected once when the graph is built;
2. otherwise the node's rule replays its forward output from its inputs, each obtained the same
   way (recursively, memoised), and a node with a saved result (Softmax, Rsqrt, Exp) ends the chain.

Each value is built at most once; it is dropped as soon as its node has been processed, since by
then every consumer has had it (the walk is in reverse topological order). A value that cannot be
rebuilt — an operand that is a constant outside the graph — is None, and rules fall back to what
they can do without it (named in their docstrings).
"""
from __future__ import annotations

import torch

from .registry import rule_for


class Values:
    def __init__(self):
        self.known: dict[tuple, torch.Tensor] = {}  # (node, k) -> value saved by a consumer
        self.memo: dict[tuple, torch.Tensor | None] = {}
        self.replays = 0  # forward steps replayed (the promise cost, δ in the paper)

    def note_saved(self, node) -> None:
        """Record the inputs `node` saved as the values of the outputs that produced them."""
        rule = rule_for(node)
        if rule is None or rule.saved is None:
            return
        for i, t in rule.saved(node).items():
            child, k = node.next_functions[i]
            if child is not None and t is not None:
                self.known.setdefault((child, k), t)

    def get(self, ctx, node, k: int = 0) -> torch.Tensor | None:
        if node is None:
            return None
        key = (node, k)
        if key in self.known:
            return self.known[key]
        if key in self.memo:
            return self.memo[key]
        if type(node).__name__ == "AccumulateGrad":
            value = node.variable.detach()
        else:
            rule = rule_for(node)
            value = None
            if rule is not None and rule.forward is not None:
                value = rule.forward(ctx, node, k)
                self.replays += 1
        self.memo[key] = value
        return value

    def release(self, node) -> None:
        for k in range(max(1, len(node._input_metadata))):
            self.memo.pop((node, k), None)
            self.known.pop((node, k), None)


def saved_inputs(**attrs: int):
    """A `saved` function: input index -> the node attribute holding it (e.g. self=0, mat2=1)."""
    items = [(f"_saved_{name}", i) for name, i in attrs.items()]

    def saved(node) -> dict[int, torch.Tensor]:
        out = {}
        for attr, i in items:
            t = getattr(node, attr, None)
            if isinstance(t, torch.Tensor):
                out[i] = t
        return out

    return saved
