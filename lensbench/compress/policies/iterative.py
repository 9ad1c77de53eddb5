"""Iterative drop (LLM-Drop's iterative variant, He et al., 2024): remove one unit per round and
re-score the remaining units on the already-reduced model.

* ranking "redundancy": the LLM-Drop cosines (block cos(h, h'), attention cos(h, h + a), MLP
  cos(h + a, h')) measured again on the reduced model each round; the most redundant goes.
* ranking "ablation": greedy by the real objective — each round removes the unit whose removal,
  together with those already removed, gives the lowest KL to the dense model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ...analyses.redundancy import token_cosine
from ...calibration import CalibrationKL
from ...capture import Hooks, batches
from ...errors import PlanError
from ...model import Model
from ...surgery import apply_units
from ...units import Unit, normalise

ITERATIVE_RANKINGS = ("redundancy", "ablation")


def iterative_drop(model: Model, texts: Sequence[str] | None, kinds: list[str], k: int, ranking: str,
                   batch_size: int = 4, seq_len: int = 128) -> tuple[list[Unit], list[dict]]:
    """Remove `k` units of `kinds` one at a time; returns the units and each round's choice and score."""
    if ranking not in ITERATIVE_RANKINGS:
        raise PlanError(f"iterative drop re-scores with {' or '.join(ITERATIVE_RANKINGS)}, not {ranking!r}")
    if not texts:
        raise PlanError("iterative drop needs calibration texts")
    if any(k_ != "block" for k_ in kinds) and not model.adapter.sublayer_drop:
        raise PlanError(f"{model.name} is post-norm: its attention and MLP cannot be removed alone")
    bs = list(batches(model, list(texts), batch_size, seq_len))
    kl = CalibrationKL(model, texts, batch_size, seq_len) if ranking == "ablation" else None
    dropped: list[Unit] = []
    trail = []
    for _ in range(k):
        gone = {(u.layer, u.kind) for u in normalise(dropped)}
        candidates = [Unit(i, kind) for kind in kinds for i in range(model.n_layers)
                      if (i, kind) not in gone and (i, "block") not in gone]
        if ranking == "ablation":
            scores = {c: _kl(kl, normalise([*dropped, c])) for c in candidates}
            choice = min(scores, key=scores.get)
        else:
            cos = layer_cosines(model, bs, normalise(dropped))
            scores = {c: cos[c.kind][c.layer] for c in candidates}
            choice = max(scores, key=scores.get)
        dropped.append(choice)
        trail.append({"unit": str(choice), "score": float(scores[choice])})
    return normalise(dropped), trail


def _kl(kl: CalibrationKL, units: list[Unit]) -> float:
    if sum(u.kind == "block" for u in units) >= kl.model.n_layers:
        return float("inf")  # nothing left to run
    return kl.removed(units)


@torch.no_grad()
def layer_cosines(model: Model, bs, removed: list[Unit]) -> dict[str, np.ndarray]:
    """LLM-Drop cosines per layer of the model with `removed` units gone (NaN for removed blocks),
    over content tokens except the first position."""
    ad = model.adapter
    blocks = list(ad.blocks)  # the original modules: hooks stay on them while the layer list changes
    L = len(blocks)
    sums = {k: np.zeros(L) for k in ("block", "attn", "mlp")}
    count = np.zeros(L)
    store: dict = {}
    with apply_units(model, removed), Hooks() as hooks:
        for i, b in enumerate(blocks):
            hooks.add_input(b, lambda x, i=i: store.__setitem__(("pre", i), x))
            hooks.add_output(b, lambda x, i=i: store.__setitem__(("post", i), x))
            hooks.add_output(b.get_submodule(ad.attn), lambda x, i=i: store.__setitem__(("attn", i), x))
        for batch in bs:
            store.clear()
            ad.base(**batch.model_inputs(), use_cache=False)
            mask = batch.content_mask.clone()
            mask[:, 0] = False
            for i in range(L):
                if ("pre", i) not in store:
                    continue
                pre, post = store[("pre", i)][mask].double(), store[("post", i)][mask].double()
                mid = pre + store[("attn", i)][mask].double() if ("attn", i) in store else pre
                for kind, (x, y) in {"block": (pre, post), "attn": (pre, mid), "mlp": (mid, post)}.items():
                    sums[kind][i] += float(token_cosine(x, y).sum())
                count[i] += int(mask.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return {k: v / count for k, v in sums.items()}
