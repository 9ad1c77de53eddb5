"""Scoring text with a model's own logits: log-probabilities of continuations (multiple-choice tasks)."""
from __future__ import annotations

from typing import Sequence

import torch

from .model import Model
from .numeric import wide


@torch.no_grad()
def continuation_logprob(model: Model, prefixes: Sequence[str], continuations: Sequence[str],
                         batch_size: int = 64) -> torch.Tensor:
    """Sum of log p(continuation tokens | prefix) for each pair, from the model's own logits."""
    tok = model.tokenizer
    ctx = model.max_context
    seqs = []
    for p, c in zip(prefixes, continuations, strict=True):
        a = tok(p)["input_ids"]
        b = tok(c, add_special_tokens=False)["input_ids"]
        if ctx is not None and len(a) + len(b) > ctx:  # keep the end of the prompt, next to the continuation
            a = a[len(a) + len(b) - ctx:]
        seqs.append((a + b, len(a)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, (x, _) in enumerate(chunk):
            ids[r, :len(x)] = torch.tensor(x)
            att[r, :len(x)] = 1
        logp = torch.log_softmax(wide(model.module(input_ids=ids, attention_mask=att, use_cache=False).logits), -1)
        for r, (x, start) in enumerate(chunk):
            pos = torch.arange(start, len(x))
            out.append(float(logp[r, pos - 1, torch.tensor(x[start:])].sum()))
    return torch.tensor(out)
