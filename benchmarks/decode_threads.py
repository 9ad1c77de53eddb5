"""Compiled decode on a shared CPU: the thread policy of `lensbench.decoding.Decoder`, quiet and beside one
competing CPU-bound process.

A Decoder runs each step on the thread count whose recent steps ran fastest (`gpu.threads.Adaptive`) and tries
the other count every `explore` steps. Beside a busy process a step on 2 threads can wait a scheduler slice for
its preempted thread, so an exploration there can cost many steps' time. This times SmolLM2-135M converted to
int4 g128 (every linear, the LM head and the embedding), one compiled Decoder, its decode steps run four ways —
always 2 threads, always 1, the Decoder's default policy (an exploration every 32 steps whatever it cost) and
the same policy with backoff (`Adaptive(backoff=8)`: the steps between explorations double, up to 8 times, after
one that lost by over 2x, as GPTQ's solves run) — in interleaved rounds, each policy one object through the
whole run, first quiet, then beside one `while True: pass` process. Tokens/s are over the decode steps only
(the prompt's time not counted).

Usage: python benchmarks/decode_threads.py [--rounds 8] [--calls 3]
Appends to reports/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, competing_process, interleaved, machine, versions  # noqa: E402
from decode import whole_model_plan  # noqa: E402

import lensbench as lb  # noqa: E402
from lensbench import decoding  # noqa: E402
from lensbench.compress.apply import convert  # noqa: E402
from lensbench.gpu.threads import Adaptive  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

STEPS = 32
BACKOFF = 8  # the candidate: explorations up to 8 x 32 steps apart after losing ones


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=3, help=f"generate calls of {STEPS} steps per method and round")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = lb.load("smollm2-135m")
    convert(model, whole_model_plan(model, 4, 128, "asym"))
    ids = model.tokenize([" ".join(bbc_news("heldout")[:4])], max_length=128).input_ids
    dec = decoding.Decoder(model, max_length=ids.shape[1] + STEPS + 1)
    policies = {"default": dec._threads, "backoff": Adaptive(2, backoff=BACKOFF)}

    def run(threads: int | None, policy: Adaptive | None = None) -> float:
        dec.threads = threads
        if policy is not None:
            dec._threads = policy
        seconds = 0.0
        for _ in range(args.calls):
            dec.generate(ids, STEPS + 1)
            seconds += dec.timings["decode_s"]
        return seconds

    methods = {"2 threads": lambda: run(2), "1 thread": lambda: run(1),
               "adaptive (default)": lambda: run(None, policies["default"]),
               f"adaptive, backoff {BACKOFF}": lambda: run(None, policies["backoff"])}
    for n in (1, 2):  # compile the step for both counts before timing
        run(n)
    quiet = interleaved(methods, args.rounds, self_timed=True, pause=0.05)
    with competing_process():
        loaded = interleaved(methods, args.rounds, self_timed=True, pause=0.05)
    tokens = args.calls * STEPS
    lines = [f"SmolLM2-135M int4 g128 (every linear, LM head and embedding), one compiled Decoder, {args.rounds} "
             f"interleaved rounds of {args.calls} x {STEPS} decode steps per method, quiet and beside one "
             f"`while True: pass` process; decode tokens/s (median / best). {machine()}; "
             f"{versions('torch', 'transformers')}.", "",
             "| threads | quiet tokens/s | under load tokens/s | loaded / quiet |", "|---|---|---|---|"]
    for k in methods:
        q, ld = tokens / statistics.median(quiet[k]), tokens / statistics.median(loaded[k])
        lines.append(f"| {k} | {q:.1f} / {tokens / min(quiet[k]):.1f} | {ld:.1f} / {tokens / min(loaded[k]):.1f} | "
                     f"{ld / q:.2f} |")
    body = "\n".join(lines) + "\n"
    print(body)
    append_report("Compiled decode on a shared CPU (benchmarks/decode_threads.py)", body)


if __name__ == "__main__":
    main()
