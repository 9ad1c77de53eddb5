"""Relevance of a model's prediction: per input token, per layer × token, per sublayer and per head.

`attribute(model, text, target=...)` runs one forward pass with gradients enabled, starts the
relevance at the chosen output (default: the logit of the model's own next-token prediction at the
last position, valued at the logit so the sinks share out the logit), propagates it with the engine
and reads it back at a few places the adapter names — the block outputs (layer × token map), the
attention and MLP outputs (relevance flowing through each sublayer) and the input of the attention
output projection (per head). The engine itself never sees those names.

Starting points: `target` a token (text or id) of a causal LM; `contrast` a second token, so the
start is logit[target] − logit[contrast]; for models without an LM head, `target` is a class index
(sequence classifiers) or a dimension of the mean-pooled last hidden state (sentence encoders;
default: its largest-magnitude dimension).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from lensbench.capture import Hooks
from lensbench.executor import ExecutorConfig, run_items
from lensbench.model import Model

from .engine import LRPConfig, propagate
from .registry import LRPError
from lensbench.profiles import LayerScores
from .plots import layer_token_map, token_heatmap


@dataclass
class Relevance:
    """One attribution. Arrays are numpy; relevance is in the units of the starting score."""

    tokens: list[str]
    token_ids: list[int]
    scores: np.ndarray  # [S] relevance per input token (word embedding)
    other_inputs: np.ndarray  # [S] relevance of position / token-type embeddings per position
    layer_tokens: np.ndarray  # [L, S] relevance of each block's output, per position
    attn: np.ndarray  # [L] relevance through each attention sublayer (signed sum)
    mlp: np.ndarray  # [L] relevance through each MLP sublayer
    heads: np.ndarray  # [L, H] relevance through each head (input of the output projection)
    target: str
    target_id: int
    start: float  # the starting score (logit, logit difference, or output value)
    conservation: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    model: str = ""

    def __repr__(self) -> str:
        top = np.argsort(-np.abs(self.scores))[:3]
        best = ", ".join(f"{self.tokens[i]!r} {self.scores[i]:+.3f}" for i in top)
        c = self.conservation
        return (f"Relevance({self.model!r} → {self.target!r}: start {self.start:.3f}, {len(self.tokens)} tokens; "
                f"top {best}; coverage {c.get('coverage', float('nan')):.2%}, "
                f"end-to-end error {c.get('end_to_end_error', float('nan')):.1e})")

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Relevance":
        """The inverse of `to_dict` (arrays come back as float64 numpy arrays)."""
        return cls(**{k: np.asarray(v, dtype=np.float64) if k in _ARRAYS else v for k, v in d.items()})

    def plot(self, kind: str = "tokens"):
        """plotly figure: "tokens" (a heatmap over the input tokens) or "layers" (layer × token map)."""

        if kind == "tokens":
            return token_heatmap(self)
        if kind == "layers":
            return layer_token_map(self)
        raise ValueError(f"kind must be 'tokens' or 'layers', not {kind!r}")


_ARRAYS = ("scores", "other_inputs", "layer_tokens", "attn", "mlp", "heads")


class AttributeWork:
    """`attribute` of one prompt per item (a prompt's index), for `attribute_all` on an executor's workers."""

    def __init__(self, texts: list[str], target, contrast, cfg: LRPConfig):
        self.texts, self.target, self.contrast, self.cfg = texts, target, contrast, cfg

    def setup(self, model: Model) -> None:
        self.model = model

    def run(self, index: int) -> dict:
        return attribute(self.model, self.texts[index], target=self.target, contrast=self.contrast,
                         cfg=self.cfg).to_dict()


def attribute_all(model: Model, texts: list[str], target=None, contrast=None, cfg: LRPConfig | None = None,
                  executor: ExecutorConfig | None = None) -> list[Relevance]:
    """`attribute` of every prompt, in order; with an executor other than serial, one prompt per work item on
    its workers (each result crosses as JSON, so its arrays come back as float64)."""
    cfg = cfg or LRPConfig()
    if executor is None or executor.kind == "serial":
        return [attribute(model, t, target=target, contrast=contrast, cfg=cfg) for t in texts]
    results = run_items(AttributeWork(list(texts), target, contrast, cfg), model, list(range(len(texts))), executor)
    return [Relevance.from_dict(r) for r in results]


@contextmanager
def _grad_on(module: torch.nn.Module):
    """Parameters require grad while the graph is built (so autograd saves the activations the rules
    read), and are restored afterwards. No .grad is ever written: the engine does not call backward."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _watch_sites(model: Model, hooks: Hooks, found: dict) -> None:
    ad = model.adapter

    def keep(key):
        def fn(t):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                found[key] = (t.grad_fn, t.output_nr)
        return fn

    def keep_input(key, module):
        def pre(m, args, kwargs):
            t = args[0] if args else next(iter(kwargs.values()))
            keep(key)(t)
        hooks.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    for layer in range(model.n_layers):
        block = ad.blocks[layer]
        hooks.add_output(block, keep(("block", layer)))
        for kind, tap in (("attn", ad.attn_out), ("mlp", ad.mlp_out)):
            module = ad.module_at(layer, tap)
            (hooks.add_output if tap.io == "output" else hooks.add_input)(module, keep((kind, layer)))
        if ad.out_proj:
            keep_input(("heads", layer), block.get_submodule(ad.out_proj))


def resolve_target(model: Model, logits: torch.Tensor, target, what: str = "target") -> int:
    """A token id from a token text / id; one-line errors for tokens outside the vocabulary."""
    vocab = logits.shape[-1]
    if isinstance(target, (int, np.integer)):
        if not 0 <= int(target) < vocab:
            raise LRPError(f"{what} id {target} is outside the vocabulary (0..{vocab - 1})")
        return int(target)
    ids = model.tokenizer(str(target), add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise LRPError(f"{what} {target!r} is {len(ids)} tokens {pieces} in {model.name}'s vocabulary, not one: "
                       f"give a single token (for a word after a space, include the space, e.g. ' Paris')")
    return int(ids[0])


def _start(model: Model, out, ids: torch.Tensor, target, contrast) -> tuple[torch.Tensor, int, str]:
    """(scalar start tensor with a graph, target id, target label)."""
    logits = getattr(out, "logits", None)
    if model.is_causal_lm:
        last = logits[0, -1]
        t = int(last.argmax()) if target is None else resolve_target(model, logits, target)
        score = last[t]
        label = model.tokenizer.decode([t])
        if contrast is not None:
            c = resolve_target(model, logits, contrast, "contrast")
            score = score - last[c]
            label = f"{label} vs {model.tokenizer.decode([c])}"
        return score, t, label
    if contrast is not None:
        raise LRPError("contrast needs a causal LM (two next-token logits to compare)")
    if logits is not None and logits.dim() == 2:  # sequence classifier
        n = logits.shape[-1]
        t = int(logits[0].argmax()) if target is None else int(target)
        if not 0 <= t < n:
            raise LRPError(f"class {target} is outside 0..{n - 1}")
        return logits[0, t], t, f"class {t}"
    hidden = out.last_hidden_state[0].mean(0)  # sentence embedding (mean pooling)
    t = int(hidden.abs().argmax()) if target is None else int(target)
    if not 0 <= t < hidden.shape[0]:
        raise LRPError(f"embedding dimension {target} is outside 0..{hidden.shape[0] - 1}")
    return hidden[t], t, f"embedding dim {t}"


def attribute(model: Model, text: str, target=None, contrast=None, cfg: LRPConfig | None = None,
              start: str = "logit", max_length: int | None = None) -> Relevance:
    """DynamicLRP relevance of `model`'s output for `text` (see the module docstring for targets).

    start: "logit" (the starting relevance is the score itself) or "one" (1.0, as DynamicLRP)."""
    cfg = cfg or LRPConfig()
    if start not in ("logit", "one"):
        raise LRPError(f"start must be 'logit' or 'one', not {start!r}")
    if not isinstance(text, str) or not text.strip():
        raise LRPError("no text to attribute: give a non-empty prompt")
    batch = model.tokenize([text], max_length=max_length)
    ids = batch.input_ids
    found: dict = {}
    module = model.module
    with _grad_on(module), Hooks() as hooks:
        _watch_sites(model, hooks, found)
        out = module(input_ids=ids, attention_mask=batch.attention_mask)
        score, t, label = _start(model, out, ids, target, contrast)
    value = float(score.detach())
    report, watched = propagate(score, None if start == "logit" else 1.0, cfg, watch=found.values())
    del out, score
    S, L = ids.shape[1], model.n_layers

    def per_position(key) -> np.ndarray:
        r = watched.get(found.get(key))
        if r is None:
            return np.zeros(S)
        r = r.reshape(-1, S, r.shape[-1]) if r.dim() >= 2 else r
        return r.sum(-1).sum(0).double().numpy() if r.dim() == 3 else np.full(S, float(r.sum()) / S)

    tokens = np.zeros(S)
    other = np.zeros(S)
    for key, r in report.sinks.items():
        node = report.sink_nodes[key]
        idx = getattr(node, "_saved_indices", None)
        r = r.reshape(-1, S) if r.numel() % S == 0 and r.numel() >= S else None
        if r is None:
            continue
        if idx is not None and idx.shape == ids.shape and bool((idx == ids).all()):
            tokens += r.sum(0).double().numpy()
        else:
            other += r.sum(0).double().numpy()
    H = model.adapter.n_heads
    heads = np.zeros((L, H))
    for layer in range(L):
        r = watched.get(found.get(("heads", layer)))
        if r is not None and r.shape[-1] % H == 0:
            heads[layer] = r.reshape(-1, H, r.shape[-1] // H).sum((0, 2)).double().numpy()
    return Relevance(
        tokens=[model.tokenizer.decode([i]) for i in ids[0].tolist()], token_ids=ids[0].tolist(),
        scores=tokens, other_inputs=other,
        layer_tokens=np.stack([per_position(("block", i)) for i in range(L)]),
        attn=np.array([per_position(("attn", i)).sum() for i in range(L)]),
        mlp=np.array([per_position(("mlp", i)).sum() for i in range(L)]),
        heads=heads, target=label, target_id=t, start=value, conservation=report.conservation(),
        config=dict(cfg.__dict__, start=start), model=model.name)


def unit_scores(rels: list[Relevance]) -> list:
    """Per-layer rankings for the Profile: the share of the starting relevance that flows through each
    block, attention sublayer, MLP sublayer and head, |R_unit| / |start|, averaged over prompts."""

    def share(a: np.ndarray, r: Relevance) -> np.ndarray:
        return np.abs(a) / max(abs(r.start), 1e-12)

    attn = np.mean([share(r.attn, r) for r in rels], 0)
    mlp = np.mean([share(r.mlp, r) for r in rels], 0)
    heads = np.mean([share(r.heads, r) for r in rels], 0)
    params = {"prompts": len(rels), "targets": [r.target for r in rels][:50], **rels[0].config}
    what = "share of the starting relevance (|R| / |start|, mean over prompts) flowing through"
    return [
        LayerScores("relevance_block", attn + mlp, True, ("layer",), "relevance", f"{what} the block's attention "
                    f"and MLP outputs (DynamicLRP)", params),
        LayerScores("relevance_attn", attn, True, ("layer",), "relevance", f"{what} the attention sublayer", params),
        LayerScores("relevance_mlp", mlp, True, ("layer",), "relevance", f"{what} the MLP sublayer", params),
        LayerScores("relevance_heads", heads, True, ("layer", "head"), "relevance",
                    f"{what} each head (input of the attention output projection)", params),
    ]
