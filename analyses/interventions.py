"""Channel interventions: project a writer head's component out of its output, or scale it, and
measure what that does to a reader head's attention and to the model's output distribution.

The edit acts on the head's real output projection (`W_O <- W_O (I + (scale - 1) v v^T)`, v the
component's unit write direction), so it is exact at inference and needs no hooks; the context
manager restores the weights in `finally`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import LensbenchError
from ..model import Model
from ..profiles import Table
from .channels import distinct_channels, head_circuits


@contextlib.contextmanager
def edit_component(model: Model, layer: int, head: int, direction: torch.Tensor, scale: float = 0.0) -> Iterator[None]:
    """Scale the part of head (layer, head)'s output along `direction` by `scale` (0: project it out)."""
    w = model.adapter.head_out_weight(layer, head)  # [d_head, d_model] view
    v = (direction / direction.norm()).to(w.dtype)
    original = w.clone()
    try:
        w.add_((scale - 1.0) * torch.outer(w @ v, v))
        yield
    finally:
        w.copy_(original)


@torch.no_grad()
def _run(model: Model, batch, reader: tuple[int, int]):
    out = model.module(**batch.model_inputs(), output_attentions=True)
    return torch.log_softmax(out.logits.float(), -1), out.attentions[reader[0]][:, reader[1]].float()


@torch.no_grad()
def intervention_effect(model: Model, texts: Sequence[str], writer: tuple[int, int], component: int,
                        reader: tuple[int, int], scale: float = 0.0, n_random: int = 5, seed: int = 0,
                        max_length: int = 64) -> dict:
    """Effect of editing one writer component vs editing random other components of the same head.

    Returns KL(dense || edited) of the next-token distribution (nats, mean over real tokens), the
    mean change of the log-probability of the text's actual next token, and the reader head's
    attention change (total variation per query row, mean over real rows).
    """
    if reader[0] <= writer[0]:
        raise LensbenchError(f"reader layer {reader[0]} must come after writer layer {writer[0]}")
    if not model.is_causal_lm:
        raise LensbenchError(f"{model.name} is not a causal LM: interventions measure next-token distributions")
    previous = model.module.config._attn_implementation
    model.module.set_attn_implementation("eager")  # attention probabilities are only returned by eager
    try:
        batch = model.tokenize(list(texts), max_length=max_length)
        mask = batch.attention_mask.bool()
        base_logp, base_pattern = _run(model, batch, reader)
        ov = head_circuits(model).ov()
        d_head = ov.S.shape[-1]
        nxt = batch.input_ids[:, 1:, None]  # the text's actual next tokens (teacher forcing)
        nxt_mask = mask[:, 1:] & mask[:, :-1]

        def target_logp(logp):
            return logp[:, :-1].gather(-1, nxt).squeeze(-1)[nxt_mask]

        base_target = target_logp(base_logp)

        def effect(i: int) -> tuple[float, float, float]:
            with edit_component(model, *writer, ov.Vt[writer[0], writer[1], i], scale):
                logp, pattern = _run(model, batch, reader)
            kl = (base_logp.exp() * (base_logp - logp)).sum(-1)[mask].mean()
            tv = 0.5 * (pattern - base_pattern).abs().sum(-1)[mask].mean()
            dlogp = (target_logp(logp) - base_target).mean()
            return float(kl), float(tv), float(dlogp)

        kl, tv, dlogp = effect(component)
        rng = np.random.default_rng(seed)
        others = rng.choice([i for i in range(d_head) if i != component], size=min(n_random, d_head - 1),
                            replace=False)
        rand = np.array([effect(int(i)) for i in others])
    finally:
        model.module.set_attn_implementation(previous)
    return {"writer": list(writer), "component": component, "reader": list(reader), "scale": scale,
            "kl_nats": kl, "reader_attention_tv": tv, "target_logprob_change": dlogp,
            "random_components": [int(i) for i in others],
            "random_kl_nats_mean": float(rand[:, 0].mean()),
            "random_reader_attention_tv_mean": float(rand[:, 1].mean()),
            "random_target_logprob_change_mean": float(rand[:, 2].mean()),
            "n_tokens": int(mask.sum())}


def interventions_table(model: Model, channels: Sequence[dict], k: int, texts: Sequence[str],
                        source: str) -> Table:
    """Project out each of the k strongest distinct channels (rows of the `channels` table) on `texts`; compare
    with random components of the same head."""
    rows = [intervention_effect(model, texts, writer, component, reader)
            for writer, component, reader in distinct_channels(channels, k)]
    return Table("interventions", rows, analysis="channels",
                 params={"texts": f"{source}, {len(texts)} texts, 64 tokens"},
                 description="project out a writer component: reader attention change and output KL vs random "
                             "components of the same head")
