"""The quantised KV cache on SmolLM2-135M and Gemma-3-270M: sensitivity, KVTuner's search, held-out quality at a
long context, a retrieval check, memory, and decode speed against transformers' dense cache.

    python benchmarks/kv.py quality [--models smollm2-135m,gemma3-270m] [--axes token,channel]
    python benchmarks/kv.py speed [--models smollm2-135m] [--contexts 512,2048,8192]

quality, per model and key layout (per-token keys as KVTuner's default, KIVI's per-channel keys):
1. `kv_sensitivity` on BBC calibration articles (prompt = first half of 256 tokens);
2. `kv-tuner` plans at 3.25 and 4.0 equivalent bits (calibration windows, never the held-out ones);
3. on held-out BBC text cut into windows of `--context` prompt tokens + 32 decoded tokens: KL to the dense model and
   perplexity of the decoded tokens, for uniform KV8/KV4/KV2, K8V4 vs K4V8 and K4V2 vs K2V4 at equal bits, and the
   searched plans. The prompt is prefilled once per window (it attends in full precision whatever the cache, so
   its states are the same for every row) and each row's cache is filled from those states, exactly what the
   prompt's own forward leaves (`kvmeasure.cache_from`), then 32 tokens are decoded one at a time through it, as
   `lensbench evaluate --context` does;
4. retrieval: a five-digit code stated at the start of a `--context`-token prompt of held-out text and asked for
   at its end; greedy answer, exact match;
5. KV-cache bytes after the prompt, measured from the tensors held, against transformers' DynamicCache.

speed: decode tokens/s (batch 1, greedy, 16 steps) with `--contexts` cached tokens, transformers' dense
DynamicCache against the packed caches (decode attention reading the codes, as `apply` runs a KV plan; and KV4
per token through the dequantising path for comparison), in interleaved rounds; median and min, and the load
average.

Writes reports/KV.md (one section per part) and appends to reports/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, machine, versions  # noqa: E402

import lensbench as lb  # noqa: E402
from lensbench.kvcache import KVSpec, cache_bytes, use_packed_attention  # noqa: E402
from lensbench.kvmeasure import cache_from, decode_through, prefill, windows  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

REPORT = Path(__file__).resolve().parent.parent / "reports" / "KV.md"
UNIFORM = [(8, 8), (8, 4), (4, 8), (4, 4), (4, 2), (2, 4), (2, 2)]


def name_of(k: int, v: int) -> str:
    return f"KV{k}" if k == v else f"K{k}V{v}"


@torch.no_grad()
def decoded(model, pre, specs) -> torch.Tensor:
    """Log-probs [steps, vocab] of the continuation decoded one token at a time through a cache holding the
    prompt states of `pre` packed as `specs` (None: transformers' dense cache)."""
    return decode_through(model, filled(model, pre, specs), pre.continuation)[0]


@torch.no_grad()
def answer(model, pre, specs, n: int = 8) -> str:
    """Greedy `n` tokens after a retrieval prompt whose states (all but its last token) are in `pre`."""
    cache = filled(model, pre, specs)
    x, out = pre.continuation, []
    for _ in range(n):
        o = model.module(input_ids=x, cache=cache, use_cache=True)
        cache, x = o.cache, o.logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(x))
    return model.tokenizer.decode(out)


def filled(model, pre, specs):
    """A cache holding the prompt states of `pre`: transformers' dense one (specs None) or packed as `specs`."""
    if specs is not None:
        return cache_from(model, pre, specs)
    cache = DynamicCache(config=model.module.config)
    for i, layer in enumerate(cache.layers):
        layer.update(pre.keys[i], pre.values[i])
    return cache


@torch.no_grad()
def timed_decode(model, pre, x, specs, steps: int) -> tuple[float, int]:
    """Tokens/s of `steps` greedy decode steps from token `x` after the prompt in `pre`, and the cache's bytes."""
    cache = filled(model, pre, specs)
    t0 = time.perf_counter()
    for _ in range(steps):
        o = model.module(input_ids=x, cache=cache, use_cache=True)
        cache, x = o.cache, o.logits[:, -1].argmax(-1, keepdim=True)
    return steps / (time.perf_counter() - t0), cache_bytes(cache)


def retrieval_prompts(model, context: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, str]]:
    rng = random.Random(seed)
    filler = windows(model, bbc_news("heldout")[200:], context, count)
    out = []
    for w in filler:
        code = str(rng.randint(10000, 99999))
        head = model.tokenizer(f"Remember this: the secret code is {code}.\n\n", add_special_tokens=False)["input_ids"]
        tail = model.tokenizer("\n\nQuestion: what is the secret code? Answer: the secret code is",
                               add_special_tokens=False)["input_ids"]
        body = w[0, : context - len(head) - len(tail)].tolist()
        out.append((torch.tensor([head + body + tail]), code))
    return out


def quality(args) -> str:
    sections = []
    for source in args.models.split(","):
        model = lb.load(source)
        L = model.n_layers
        held = windows(model, bbc_news("heldout"), args.context + 33, args.windows)
        pres = [prefill(model, ids, args.context) for ids in held]
        dense = [decoded(model, pre, None) for pre in pres]
        tgt = [pre.continuation[0, 1:, None] for pre in pres]
        dense_nll = -sum(float(lp.gather(1, t).sum()) for lp, t in zip(dense, tgt, strict=True))
        n_tok = sum(int(t.shape[0]) for t in tgt)
        probes = [(prefill(model, ids, ids.shape[1] - 1), code)
                  for ids, code in retrieval_prompts(model, args.context, args.retrieval)]
        dense_hits = [code in answer(model, pre, None) for pre, code in probes]
        for axis in args.axes.split(","):
            t0 = time.time()
            profile = lb.profile(model, bbc_news("calibration", limit=args.calib), analyses=["kv_sensitivity"],
                                 analysis_params={"kv_sensitivity": {"axis": axis}}, seq_len=256, progress=False)
            t_sens = time.time() - t0
            kvv = profile.tables["kv_keys_vs_values"].rows
            rows: list[tuple[str, float, dict]] = [(name_of(k, v), (k + v) / 2, {i: KVSpec(k, v, axis)
                                                                                for i in range(L)})
                                                   for k, v in UNIFORM]
            searched = {}
            for budget in (3.25, 4.0):
                t0 = time.time()
                plan = lb.plan(profile, "kv-tuner", budget, model=model, trials=args.trials)
                searched[budget] = (plan, time.time() - t0)
                bound = plan.bind(model)
                rows.append((f"kv-tuner {budget:g}", plan.predicted["kv_bits"], dict(bound.kv)))
            table = []
            for name, bits, specs in rows:
                kl = nll = 0.0
                for pre, lp, t in zip(pres, dense, tgt, strict=True):
                    lq = decoded(model, pre, specs)
                    kl += float((lp.exp() * (lp - lq)).sum())
                    nll -= float(lq.gather(1, t).sum())
                hits = [code in answer(model, pre, specs) for pre, code in probes]
                mem = cache_bytes(filled(model, pres[0], specs)) / cache_bytes(filled(model, pres[0], None))
                table.append((name, bits, kl / n_tok, math.exp(nll / n_tok), sum(hits), mem))
                print(f"{source} {axis} {name}: KL {kl / n_tok:.4f} ppl {math.exp(nll / n_tok):.2f} retrieval "
                      f"{sum(hits)}/{len(hits)}", flush=True)
            lines = [f"### {source}, {axis} keys\n",
                     f"Sensitivity: {args.calib} calibration articles, {t_sens:.0f} s. Keys vs values (calibration KL, "
                     f"mean over layers): " + "; ".join(
                         f"{r['key_heavy']} {r['key_heavy_kl']:.4f} vs {r['value_heavy']} {r['value_heavy_kl']:.4f} "
                         f"(more key bits better in {r['layers_key_heavy_better']:.0%} of layers)" for r in kvv) + ".",
                     "", "kv-tuner: " + "; ".join(
                         f"{b:g} bits -> {p.predicted['kv_bits']:.3f} bits, calibration KL "
                         f"{p.predicted['calibration_kl']:.4f}, groups {p.meta['kv_tuner']['groups']}, "
                         f"{p.meta['kv_tuner']['trials']} trials, {s:.0f} s" for b, (p, s) in searched.items())
                     + ".", "",
                     f"| cache | bits | KL to dense | ppl (dense {math.exp(dense_nll / n_tok):.2f}) | retrieval "
                     f"(dense {sum(dense_hits)}/{len(probes)}) | KV bytes / dense |", "|---|---|---|---|---|---|"]
            for name, bits, kl, ppl, hits, mem in table:
                lines.append(f"| {name} | {bits:.3g} | {kl:.4f} | {ppl:.2f} | {hits}/{len(probes)} | {mem:.3f} |")
            sections.append("\n".join(lines) + "\n")
    load = os.getloadavg()[0]
    head = (f"`python benchmarks/kv.py quality --models {args.models} --axes {args.axes} --context {args.context} "
            f"--windows {args.windows} --calib {args.calib} --trials {args.trials} --retrieval {args.retrieval}`; "
            f"{machine()}; {versions('torch', 'transformers', 'optuna')}; load average {load:.1f} at the end. "
            f"Held-out BBC text in {args.windows} windows of {args.context} prompt tokens + 32 tokens decoded one at a "
            f"time (KL and perplexity over those); retrieval: a code stated at the start of a {args.context}-token "
            f"prompt, greedy 8 tokens, exact match; KV bytes after one prompt, against transformers' DynamicCache "
            f"(float32; Gemma's local layers keep 511 tokens in both). No full-precision window (window 0); "
            f"per-channel keys in blocks of 32 tokens, so up to 31 recent keys stay in full precision.\n")
    return head + "\n" + "\n".join(sections)


def speed(args) -> str:
    lines = []
    for source in args.models.split(","):
        model = lb.load(source)
        L = model.n_layers
        stream = windows(model, bbc_news("heldout"), max(map(int, args.contexts.split(","))) + 1, 1)[0]
        for ctx in map(int, args.contexts.split(",")):
            pre = prefill(model, stream[:, :ctx + 1], ctx)
            x = stream[:, ctx:ctx + 1]
            caches = {"dense": (None, False), **{
                f"{name_of(k, v)} {axis}{' dequantising' if not fused else ''}": (
                    {i: KVSpec(k, v, axis) for i in range(L)}, fused)
                for k, v in ((8, 8), (4, 4)) for axis in ("token", "channel") for fused in (True, False)
                if fused or (k, axis) == (4, "token")}}

            load0 = os.getloadavg()[0]
            res: dict[str, list] = {k: [] for k in caches}
            rng = random.Random(0)
            timed_decode(model, pre, x, None, 2)
            for _ in range(args.rounds):
                order = list(caches)
                rng.shuffle(order)
                for k in order:
                    specs, fused = caches[k]
                    undo = use_packed_attention(model.module) if fused else (lambda: None)
                    try:
                        res[k].append(timed_decode(model, pre, x, specs, args.steps))
                    finally:
                        undo()
            dense = [r[0] for r in res["dense"]]
            for k, v in res.items():
                tps = [r[0] for r in v]
                paired = statistics.median(a / b for a, b in zip(tps, dense, strict=True))
                lines.append(f"| {source} | {ctx} | {k} | {statistics.median(tps):.2f} | {min(tps):.2f} | "
                             f"x{paired:.2f} | {v[0][1] / 2**20:.1f} MiB | {load0:.1f} |")
            print("\n".join(lines[-len(caches):]), flush=True)
    head = (f"`python benchmarks/kv.py speed --models {args.models} --contexts {args.contexts} --rounds {args.rounds} "
            f"--steps {args.steps}`; {machine()}; {versions('torch', 'transformers')}. Batch 1, greedy, "
            f"{args.steps} decode steps after a prompt of the given length, {args.rounds} interleaved rounds; "
            f"x dense = median over rounds of (tokens/s / dense tokens/s in the same round). Packed rows decode with "
            f"attention on the codes (`packed_sdpa`) unless marked dequantising.\n")
    return head + "\n" + "\n".join(["| model | cached tokens | cache | tokens/s median | min | x dense (paired) | KV "
                                    "bytes after | load avg |", "|---|---|---|---|---|---|---|---|", *lines]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("quality", "speed"))
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--axes", default="token,channel")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--calib", type=int, default=6)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--retrieval", type=int, default=10)
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    body = quality(args) if args.part == "quality" else speed(args)
    print(body)
    title = {"quality": "KV-cache quality, memory and KVTuner's search", "speed": "KV-cache decode speed"}[args.part]
    append_report(f"{title} (benchmarks/kv.py {args.part})", body)
    text = REPORT.read_text() if REPORT.exists() else "# KV cache\n"
    marker = f"\n## {title}\n"
    before, _, after = text.partition(marker)
    rest = after.split("\n## ", 1)
    tail = ("\n## " + rest[1]) if len(rest) > 1 else ""
    REPORT.write_text(before.rstrip() + "\n" + marker + "\n" + body + tail)


if __name__ == "__main__":
    main()
