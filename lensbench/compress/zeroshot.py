"""Zero-shot multiple choice scored the way lm-evaluation-harness scores it: the log-likelihood of each
option's tokens after the prompt, normalised by the option's length in bytes (its `acc_norm`); the choice is
the option with the highest score.

`bbc_topics`: held-out BBC articles (the first 40 words) as "Article: ...\nTopic:", with the five topics as
options. Its floors are reported beside it: chance (1/5) and the accuracy against labels
shuffled across the items, so a model that answers from surface cues alone shows up as no better than that.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from ..scoring import continuation_logprob
from ..texts import BBC_TOPICS, bbc_news

OPTIONS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
           "tech": "technology"}
PROMPT = "Article: {text}\nTopic:"
WORDS = 40  # of each article in its prompt


def bbc_topics(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, index of the true option) for `n` held-out articles, topics interleaved."""
    per = -(-n // len(BBC_TOPICS))
    by_topic = [bbc_news("heldout", limit=per, topics=(t,)) for t in BBC_TOPICS]
    items = []
    for i in range(per):
        for label, texts in enumerate(by_topic):
            if i < len(texts):
                items.append((PROMPT.format(text=" ".join(texts[i].split()[:WORDS])), label))
    return items[:n]


@torch.no_grad()
def choice_scores(model, prompts: Sequence[str], options: Sequence[str]) -> torch.Tensor:
    """[items, options] length-normalised log-likelihoods (acc_norm's score)."""
    conts = [" " + o for o in options]
    pre = [p for p in prompts for _ in conts]
    ll = continuation_logprob(model, pre, conts * len(prompts)).reshape(len(prompts), len(conts))
    return ll / torch.tensor([len(c.encode()) for c in conts], dtype=ll.dtype)


def accuracy(scores: torch.Tensor, labels: Sequence[int]) -> float:
    return float((scores.argmax(1) == torch.tensor(labels)).float().mean())


def topic_task(model, n: int, seed: int = 0, items: list | None = None) -> dict:
    """Accuracy on `bbc_topics`, with its floors (chance, shuffled labels)."""
    items = items if items is not None else bbc_topics(n, seed)
    labels = [y for _, y in items]
    scores = choice_scores(model, [p for p, _ in items], list(OPTIONS.values()))
    shuffled = labels[:]
    random.Random(seed).shuffle(shuffled)
    return {"accuracy": accuracy(scores, labels), "shuffled_label_accuracy": accuracy(scores, shuffled),
            "chance": 1 / len(OPTIONS), "items": len(items)}
