"""The DynamicLRP engine: relevance propagated over the autograd graph, one rule per operation.

`propagate(output, relevance)` starts from a tensor's `grad_fn` and visits every node in reverse
topological order (Kahn's algorithm over consumer counts: a node runs only when all the nodes that
consumed its outputs have delivered their relevance). Each node's rule, looked up by autograd name
in the registry, turns the relevance of its outputs into relevance of its inputs; forward values the
rule needs come from the graph's saved tensors or from promises (`promises.py`). Nothing here knows
about models: the same walk covers any architecture whose operations have rules.

Only *live* nodes — those that depend on the input (an embedding lookup, or a leaf marked as input)
— receive relevance. Weights and buffers are constants: a product with a weight is linear in the
input, so it passes relevance on (the ε-rule); an added constant (a bias) keeps its share, which is
reported as absorbed.

Conservation is checked per node: |ΣR_out − ΣR_in − absorbed| / Σ|R_out|, the largest per operation
type, and end to end: what reached the sinks (token embeddings, other embeddings, input leaves) plus
what was absorbed, against the starting relevance.
"""
from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from .promises import Values
from .registry import LRPError, op_name, rule_for, unsupported

SINKS = ("EmbeddingBackward0", "EmbeddingBackward1", "AccumulateGrad")


@dataclass
class LRPConfig:
    """Rule choices. eps: the ε of the ε-rule (z + ε·sign z). gamma: > 0 turns linear layers into the
    γ-rule (W + γW⁺). attn_lrp: softmax by the AttnLRP rule x ⊙ (R − s·ΣR) (off: identity).
    cp_lrp: attention passes relevance only through the values (the softmax and q/k get none), in fused
    attention and in eager attention (a matrix product whose operand comes from a softmax).
    bilinear: how a product of two live operands splits — "proportional" to |a| and |b|
    (DynamicLRP's Mul rule) or "uniform" halves (AttnLRP). Matrix products of two live operands
    always split uniformly. strict: an operation without a rule raises (off: its relevance is
    absorbed and the operation is listed in the report)."""

    eps: float = 1e-9
    gamma: float = 0.0
    attn_lrp: bool = True  # our default (DynamicLRP's is off): higher ABPC on SmolLM2, see reports/LRP.md
    cp_lrp: bool = False
    bilinear: str = "proportional"
    strict: bool = True

    def __post_init__(self):
        if self.bilinear not in ("proportional", "uniform"):
            raise LRPError(f"bilinear must be 'proportional' or 'uniform', not {self.bilinear!r}")
        if self.eps < 0 or self.gamma < 0:
            raise LRPError("eps and gamma must be >= 0")


@dataclass
class Graph:
    order: list  # nodes, consumers before producers
    live: set

    @classmethod
    def build(cls, root, inputs: set) -> "Graph":
        consumers: Counter = Counter()
        seen, stack = {root}, [root]
        while stack:  # consumer counts over the reachable graph
            node = stack.pop()
            for child, _ in node.next_functions:
                if child is None:
                    continue
                consumers[child] += 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        pending, order, ready = Counter(consumers), [], [root]
        while ready:  # Kahn: a node is ready once every consumer has been ordered
            node = ready.pop()
            order.append(node)
            for child, _ in node.next_functions:
                if child is not None:
                    pending[child] -= 1
                    if pending[child] == 0:
                        ready.append(child)
        live = set()
        for node in reversed(order):  # producers first
            name = op_name(node)
            if name.startswith("EmbeddingBackward") or (name == "AccumulateGrad" and id(node.variable) in inputs):
                live.add(node)
            elif any(c in live for c, _ in node.next_functions if c is not None):
                live.add(node)
        return cls(order, live)


@dataclass
class Report:
    """What one propagation did: sinks, absorption, conservation, coverage."""

    start: float
    sinks: dict = field(default_factory=dict)  # (node name, id) -> relevance tensor (summed over the last dim)
    sink_nodes: dict = field(default_factory=dict)
    absorbed: Counter = field(default_factory=Counter)  # category -> relevance
    op_error: dict = field(default_factory=lambda: defaultdict(float))  # op -> max relative error
    uncovered: Counter = field(default_factory=Counter)
    unresolved: Counter = field(default_factory=Counter)  # op -> times an operand could not be rebuilt
    n_nodes: int = 0
    n_live: int = 0
    replays: int = 0

    @property
    def coverage(self) -> float:
        return 1.0 - sum(self.uncovered.values()) / max(self.n_nodes, 1)

    @property
    def sink_total(self) -> float:
        return float(sum(float(r.sum()) for r in self.sinks.values()))

    @property
    def end_to_end_error(self) -> float:
        """|start − (sinks + absorbed)| / |start|: relevance that went missing (ε leakage)."""
        total = self.sink_total + sum(self.absorbed.values())
        return abs(self.start - total) / max(abs(self.start), 1e-12)

    def conservation(self) -> dict:
        return {"start": self.start, "sinks": self.sink_total, "absorbed": dict(self.absorbed),
                "end_to_end_error": self.end_to_end_error,
                "per_op_max_error": dict(sorted(self.op_error.items())),
                "coverage": self.coverage, "nodes": self.n_nodes, "live_nodes": self.n_live,
                "uncovered": dict(self.uncovered), "unresolved": dict(self.unresolved),
                "promise_replays": self.replays}


class Context:
    """What rules see: config, forward values (via promises), liveness, absorption."""

    def __init__(self, cfg: LRPConfig, graph: Graph, report: Report):
        self.cfg, self.graph, self.report = cfg, graph, report
        self.values = Values()
        self._absorbed = 0.0

    def input(self, node, i: int) -> torch.Tensor | None:
        rule = rule_for(node)
        if rule is not None and rule.saved is not None:
            t = rule.saved(node).get(i)
            if t is not None:
                return t
        child, k = node.next_functions[i]
        return self.values.get(self, child, k)

    def value(self, node, k: int = 0) -> torch.Tensor | None:
        return self.values.get(self, node, k)

    def live(self, node, i: int) -> bool:
        child = node.next_functions[i][0]
        return child is not None and child in self.graph.live

    def unresolved(self, node) -> None:
        self.report.unresolved[op_name(node)] += 1

    def absorb(self, category: str, amount) -> None:
        amount = float(amount.sum()) if isinstance(amount, torch.Tensor) else float(amount)
        if amount == 0.0:
            return
        self.report.absorbed[category] += amount
        self._absorbed += amount

    @staticmethod
    def out_shape(node, k: int = 0) -> tuple:
        return tuple(node._input_metadata[k].shape)


def _sum(ts) -> float:
    return float(sum(float(t.sum()) for t in ts if t is not None))


def _mass(ts) -> float:
    return float(sum(float(t.abs().sum()) for t in ts if t is not None))


@torch.no_grad()
def propagate(output: torch.Tensor, relevance: torch.Tensor | float | None = None, cfg: LRPConfig | None = None,
              inputs=(), watch=()) -> tuple[Report, dict]:
    """Relevance from `output` (a tensor with a grad graph) back to the graph's sinks.

    relevance: the starting relevance, output's shape (default: the output's own value, so the
    sinks share out the output). inputs: leaf tensors that are inputs (e.g. inputs_embeds), whose
    relevance is recorded as a sink. watch: (node, k) pairs whose output relevance is returned.
    Returns the Report and {watched pair: relevance}."""
    cfg = cfg or LRPConfig()
    if not isinstance(output, torch.Tensor) or output.grad_fn is None:
        raise LRPError("the output has no autograd graph: run the forward pass with gradients enabled "
                       "(torch.enable_grad()) and from a model whose parameters or inputs require grad")
    if relevance is None:
        relevance = output.detach().clone()
    elif not isinstance(relevance, torch.Tensor):
        relevance = torch.full_like(output, float(relevance))
    if relevance.shape != output.shape:
        raise LRPError(f"starting relevance has shape {tuple(relevance.shape)}, the output {tuple(output.shape)}")
    root = output.grad_fn
    graph = Graph.build(root, {id(t) for t in inputs})
    report = Report(start=float(relevance.sum()), n_nodes=len(graph.order), n_live=len(graph.live))
    missing = [op_name(n) for n in graph.order if rule_for(n) is None and op_name(n) not in SINKS]
    if missing and cfg.strict:
        raise unsupported(missing)
    report.uncovered.update(missing)
    ctx = Context(cfg, graph, report)
    for node in graph.order:
        ctx.values.note_saved(node)
    watch = set(watch)
    watched: dict = {}
    rel: dict = {root: [relevance.detach().to(torch.float32)]}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        for node in graph.order:
            R = rel.pop(node, None)
            if R is None or node not in graph.live:
                ctx.values.release(node)
                continue
            for k, r in enumerate(R):
                if (node, k) in watch and r is not None:
                    watched[(node, k)] = r
            name = op_name(node)
            if name in SINKS:
                report.sinks[(name, id(node))] = R[0].sum(-1) if R[0].dim() else R[0]
                report.sink_nodes[(name, id(node))] = node
                continue
            rule = rule_for(node)
            out_total = _sum(R)
            if rule is None:
                ctx.absorb(f"uncovered:{name}", out_total)
                ctx.values.release(node)
                continue
            ctx._absorbed = 0.0
            R_in = rule.relevance(ctx, node, R)
            in_total, absorbed = _sum(R_in), ctx._absorbed
            for (child, k), r in zip(node.next_functions, R_in, strict=True):
                if r is None:
                    continue
                if child is None or child not in graph.live:
                    ctx.absorb("constant", r)
                    absorbed += float(r.sum())
                    in_total -= float(r.sum())
                    continue
                slots = rel.setdefault(child, [None] * max(1, len(child._input_metadata)))
                slots[k] = r if slots[k] is None else slots[k] + r
            err = abs(out_total - in_total - absorbed) / (_mass(R) + 1e-30)
            report.op_error[name] = max(report.op_error[name], err)
            ctx.values.release(node)
    finally:
        sys.setrecursionlimit(limit)
    report.replays = ctx.values.replays
    return report, watched
