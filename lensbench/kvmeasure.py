"""Measuring a KV-cache precision on text: the dense prompt once, then any number of cache settings.

A `Prefilled` holds what the dense model computed for one text: every layer's keys and values of the
first `context` tokens, and the dense log-probabilities (and attention outputs) of the continuation that
follows. `continuation_scores(model, pre, specs)` fills a `KVCache` with those prompt states, exactly as
the prompt's own forward would (the prompt attends in full precision either way), and runs only the
continuation against it: the continuation's tokens attend to the packed prompt (and, with `window=0`, to
each other's packed states, as token-by-token decoding would). So one setting costs one forward of the
continuation, not of the whole text.

`windows` cuts held-out texts into long token windows (texts joined, so a 2k-token context need not be one
article), and `decode_logprobs` runs real token-by-token decoding for `evaluate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import LensbenchError
from .kvcache import KVCache, KVSpec
from .model import Model
from .numeric import wide


def windows(model: Model, texts: Sequence[str], length: int, count: int) -> list[torch.Tensor]:
    """`count` windows [1, length] of token ids, cut from the texts joined by blank lines (fewer when the
    texts run out)."""
    tok = model.tokenizer
    stream: list[int] = []
    out = []
    for text in texts:
        stream += tok(text + "\n\n", add_special_tokens=False)["input_ids"]
        while len(stream) >= length and len(out) < count:
            out.append(torch.tensor([stream[:length]]))
            stream = stream[length:]
        if len(out) >= count:
            break
    if not out:
        raise LensbenchError(f"the texts hold fewer than {length} tokens: give more text or a shorter --context")
    return out


def attention_modules(model: Model) -> list[torch.nn.Module]:
    ad = model.adapter
    return [ad.blocks[i].get_submodule(ad.attn) for i in range(model.n_layers)]


@dataclass
class Prefilled:
    """One text's dense prompt states and continuation (see the module docstring)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    continuation: torch.Tensor  # ids [1, M]
    logp: torch.Tensor  # dense log-probabilities [M, vocab] (float64)
    attn: list[torch.Tensor]  # dense attention outputs [1, M, d] per layer on the continuation


def _record(outputs: list, i: int):
    def hook(module, args, out):
        outputs[i] = (out[0] if isinstance(out, tuple) else out).detach()
    return hook


@torch.no_grad()
def prefill(model: Model, ids: torch.Tensor, context: int) -> Prefilled:
    """Dense prompt states of `ids[:, :context]` and the dense run of the rest."""
    if not model.is_causal_lm:
        raise LensbenchError(f"{model.name} is an encoder: it has no KV cache to measure")
    if not 0 < context < ids.shape[1]:
        raise LensbenchError(f"context {context} must leave tokens to continue with in a window of {ids.shape[1]}")
    full = Cache(layers=[DynamicLayer() for _ in range(model.n_layers)])  # whole states, also of local layers
    model.module(input_ids=ids[:, :context], cache=full, use_cache=True)
    attn: list = [None] * model.n_layers
    handles = [m.register_forward_hook(_record(attn, i)) for i, m in enumerate(attention_modules(model))]
    try:
        logits = model.module(input_ids=ids[:, context:], cache=full, use_cache=True).logits[0]
    finally:
        for h in handles:
            h.remove()
    return Prefilled([layer.keys[:, :, :context] for layer in full.layers],
                     [layer.values[:, :, :context] for layer in full.layers],
                     ids[:, context:], torch.log_softmax(wide(logits[:-1]), -1), attn)


def cache_from(model: Model, pre: Prefilled, specs: dict[int, KVSpec]) -> KVCache:
    """A KVCache holding the prompt states, as the prompt's forward would have left it."""
    cache = KVCache(model.module.config, specs)
    for i, layer in enumerate(cache.layers):
        layer.update(pre.keys[i], pre.values[i])
    return cache


@torch.no_grad()
def continuation_scores(model: Model, pre: Prefilled, specs: dict[int, KVSpec],
                        attn_layer: int | None = None) -> dict:
    """KL(dense || with `specs`) summed over the continuation's predictions, their count, and with
    `attn_layer` the relative squared error of that layer's attention output."""
    seen: list = [None] * model.n_layers
    handle = None
    if attn_layer is not None:
        handle = attention_modules(model)[attn_layer].register_forward_hook(_record(seen, attn_layer))
    try:
        logits = model.module(input_ids=pre.continuation, cache=cache_from(model, pre, specs), use_cache=True).logits[0]
    finally:
        if handle is not None:
            handle.remove()
    logq = torch.log_softmax(wide(logits[:-1]), -1)
    out = {"kl": float((pre.logp.exp() * (pre.logp - logq)).sum()), "n": int(logq.shape[0])}
    if attn_layer is not None:
        ref = pre.attn[attn_layer].double()
        out["attn_error"] = float(((seen[attn_layer].double() - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30))
    return out


@torch.no_grad()
def decode_logprobs(model: Model, ids: torch.Tensor, context: int) -> tuple[torch.Tensor, Cache]:
    """Prompt `ids[:, :context]`, then the rest fed one token at a time through the model's cache (whatever
    a plan installed): log-probabilities [steps, vocab] of each decoded step's next token, and the cache."""
    return decode_through(model, model.module(input_ids=ids[:, :context], use_cache=True).cache, ids[:, context:])


@torch.no_grad()
def decode_through(model: Model, cache: Cache, ids: torch.Tensor) -> tuple[torch.Tensor, Cache]:
    """`ids` [1, n] fed one token at a time through `cache` (teacher-forced decoding): log-probabilities
    [n - 1, vocab] of each step's next token, and the cache."""
    rows = []
    for t in range(ids.shape[1] - 1):
        out = model.module(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = out.cache
        rows.append(out.logits[0, -1])
    return torch.log_softmax(wide(torch.stack(rows)), -1), cache
