"""The Laundry List task (Talking Heads: Merullo, Eickhoff & Pavlick, 2024, arXiv 2406.09519): recall the one
list item not yet mentioned.

A prompt lists N distinct single-token items, then repeats all but one; the model should name the
missing one next. Accuracy falls as N grows and depends on the missing item's position. The weight
edit of the paper rescales identified writer components (`W_O <- W_O (I + (alpha - 1) v v^T)`).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import LensbenchError
from ..model import Model
from ..profiles import Table
from .channels import distinct_channels, head_circuits
from .interventions import edit_component

CANDIDATE_ITEMS = (
    "milk", "eggs", "bread", "butter", "cheese", "apples", "rice", "tea", "coffee", "sugar", "salt", "flour",
    "honey", "soap", "shirt", "socks", "towel", "shoes", "hat", "coat", "gloves", "scarf", "jeans", "jacket",
    "pens", "paper", "books", "lamp", "chair", "table", "cups", "plates", "spoons", "knives", "forks", "candles",
    "beans", "pasta", "fish", "meat", "juice", "water", "wine", "beer", "oil", "soup", "cake", "nuts",
)
TEMPLATE = ("{name} made a shopping list: {items}. At the shop, {name} bought {bought}. "
            "The only thing {name} still had to buy was")
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry")


def item_token_ids(model: Model, candidates: Sequence[str] = CANDIDATE_ITEMS) -> dict[str, int]:
    """Token id of each item that the model's tokenizer encodes as one token after a space."""
    ids = {c: model.tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in candidates}
    return {c: i[0] for c, i in ids.items() if len(i) == 1}


def single_token_items(model: Model, candidates: Sequence[str] = CANDIDATE_ITEMS) -> list[str]:
    """Items that the model's tokenizer encodes as one token after a space."""
    return list(item_token_ids(model, candidates))


def _join(words: Sequence[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: str
    items: tuple[str, ...]
    missing_position: int


def make_prompts(model: Model, n_items: int, count: int, seed: int = 0) -> list[Prompt]:
    """`count` prompts with `n_items` distinct single-token items; the missing position cycles evenly."""
    items = single_token_items(model)
    if n_items < 2:
        raise LensbenchError(f"a laundry list needs at least 2 items, got {n_items}")
    if n_items > len(items):
        raise LensbenchError(f"{n_items} items asked for, but only {len(items)} candidate items are single tokens "
                             f"for {model.name}'s tokenizer; use at most {len(items)}")
    rng = random.Random(seed)
    prompts = []
    for k in range(count):
        chosen = rng.sample(items, n_items)
        missing = k % n_items
        bought = [w for i, w in enumerate(chosen) if i != missing]
        rng.shuffle(bought)
        name = rng.choice(NAMES)
        text = TEMPLATE.format(name=name, items=_join(chosen), bought=_join(bought))
        prompts.append(Prompt(text, chosen[missing], tuple(chosen), missing))
    return prompts


@torch.no_grad()
def accuracy(model: Model, prompts: Sequence[Prompt], batch_size: int = 32) -> dict:
    """Share of prompts whose most likely next token, among the prompt's items, is the missing item;
    also the top-1 accuracy over the whole vocabulary."""
    token = item_token_ids(model, sorted({w for p in prompts for w in p.items}))
    among, top1 = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = model.tokenize([p.text for p in chunk])
        logits = model.module(**batch.model_inputs()).logits
        last = batch.attention_mask.sum(1) - 1
        final = logits[torch.arange(len(chunk)), last]
        for p, row in zip(chunk, final, strict=True):
            ids = [token[w] for w in p.items]
            answer = token[p.answer]
            among.append(ids[int(row[ids].argmax())] == answer)
            top1.append(int(row.argmax()) == answer)
    by_position: dict[int, list[bool]] = {}
    for p, ok in zip(prompts, among, strict=True):
        by_position.setdefault(p.missing_position, []).append(ok)
    return {"accuracy_among_items": sum(among) / len(among), "accuracy_top1": sum(top1) / len(top1),
            "by_missing_position": {k: sum(v) / len(v) for k, v in sorted(by_position.items())},
            "n_prompts": len(prompts)}


def accuracy_curve(model: Model, n_values: Sequence[int] = (2, 3, 4, 5, 6, 8, 10), count: int = 60,
                   seed: int = 0) -> list[dict]:
    """Accuracy vs the number of items N (the paper's capacity curve)."""
    return [{"n_items": n, **accuracy(model, make_prompts(model, n, count, seed))} for n in n_values]


@torch.no_grad()
def weight_edit_study(model: Model, channels: Sequence[dict], n_items: int = 5, count: int = 60,
                      screen: int = 8, keep: int = 2, alphas: Sequence[float] = (1.5, 2.0, 3.0)) -> dict:
    """The paper's weight edit, chosen on a tuning split and measured on held-out prompts.

    1. screen: ablate (alpha=0) each of the `screen` strongest distinct writer components in
       `channels` and measure the tuning-split accuracy drop;
    2. keep the `keep` components whose ablation hurts most, rescale them together by each alpha,
       pick the best alpha on the tuning split;
    3. report held-out accuracy (other prompts, other seed) with and without that edit.
    """

    vt = head_circuits(model).ov().Vt
    tune, held = make_prompts(model, n_items, count, seed=1), make_prompts(model, n_items, count, seed=2)

    def acc(prompts, comps, alpha) -> float:
        with contextlib.ExitStack() as stack:
            for layer, head, i in comps:
                stack.enter_context(edit_component(model, layer, head, vt[layer, head, i], alpha))
            return accuracy(model, prompts)["accuracy_among_items"]

    seen = list(dict.fromkeys((w[0], w[1], i) for w, i, _ in distinct_channels(channels, len(channels))))[:screen]
    base_tune = acc(tune, [], 1.0)
    drops = sorted(((base_tune - acc(tune, [c], 0.0), c) for c in seen), reverse=True)
    chosen = [c for _, c in drops[:keep]]
    tuned = {a: acc(tune, chosen, a) for a in alphas}
    best = max(tuned, key=tuned.get)
    return {"n_items": n_items, "components": [list(c) for c in chosen],
            "ablation_drop_on_tuning": {f"{c[0]}.{c[1]}c{c[2]}": round(d, 4) for d, c in drops},
            "tuning_accuracy_by_alpha": {"1.0": base_tune, **{str(a): v for a, v in tuned.items()}},
            "alpha": best, "heldout_accuracy_dense": acc(held, [], 1.0),
            "heldout_accuracy_edited": acc(held, chosen, best), "n_prompts_each": count}


def curve_table(model: Model, n_values: Sequence[int], count: int) -> Table:
    """The accuracy curve as a Profile table, with how many candidate items are single tokens for `model`."""
    return Table("laundry_curve", accuracy_curve(model, n_values, count=count), analysis="laundry",
                 params={"count": count, "n_single_token_items": len(single_token_items(model)),
                         "n_candidate_items": len(CANDIDATE_ITEMS)},
                 description="Laundry List accuracy vs number of items and missing position")


def edit_table(model: Model, channels: Sequence[dict], n_items: int, count: int) -> Table:
    """The weight-edit study (`weight_edit_study`) as a Profile table."""
    return Table("laundry_edit", [weight_edit_study(model, channels, n_items=n_items, count=count)],
                 analysis="laundry",
                 description="rescaled channel components: chosen and tuned on one split, held-out result")
