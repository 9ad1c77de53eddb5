"""GPTQ solves on a shared CPU: the thread count each solve runs on, quiet and with one competing CPU-bound process.

A GPTQ solve (`lensbench.compress.gptq.gptq_weight`) is thousands of small tensor operations. On 2 threads each one
waits at its end for a preempted thread when another process shares the cores, so lensbench runs each solve on the
count whose recent solves ran fastest (`gptq.solve_threads`: `gpu.threads.Adaptive` with backoff). This times the
7 linears of SmolLM2-135M's block 3 (int4, group 128, act-order, searched ranges; their Hessians from BBC
calibration text) solved three ways — always 2 threads, always 1, and the default policy (one policy object
through the whole run, as in one process, so it meets the load when it comes) — in interleaved rounds, first
quiet, then beside one `while True: pass` process.

Usage: python benchmarks/gptq_threads.py [--rounds 3] [--calib 8]
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

import lensbench as lb  # noqa: E402
from lensbench.compress import gptq  # noqa: E402
from lensbench.simquant import block_linears  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

BLOCK = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calib", type=int, default=8, help="BBC calibration articles for the Hessians")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = lb.load("smollm2-135m")
    names = [f"{model.adapter.block_path(BLOCK)}.{n}" for n in block_linears(model)]
    texts = bbc_news("calibration", limit=args.calib)
    work = None
    for i, mine, hessians, _ in gptq.block_hessians(model, names, texts):
        if i == BLOCK:
            work = [(m.weight.detach().clone(), hessians[n]) for n, m in mine.items()]
            break
    class Fixed:
        options = [1, 2]

        def __init__(self, n: int):
            self.n = n

        def choose(self) -> int:
            return self.n

        def record(self, n: int, seconds: float) -> None:
            pass

    policy = gptq.solve_policy(2)

    def solve(choice) -> None:
        gptq._POLICY[:] = [choice]
        for w, h in work:
            gptq.gptq_weight(w, h, 4, 128)

    methods = {"2 threads": lambda: solve(Fixed(2)), "1 thread": lambda: solve(Fixed(1)),
               "adaptive (default)": lambda: solve(policy)}
    solve(Fixed(2))  # warm-up
    quiet = interleaved(methods, args.rounds, pause=0.05)
    with competing_process():
        loaded = interleaved(methods, args.rounds, pause=0.05)
    lines = [f"SmolLM2-135M block {BLOCK}'s {len(work)} linears solved by GPTQ (int4 g128, act-order, searched "
             f"ranges; Hessians from {args.calib} BBC calibration articles), {args.rounds} interleaved rounds each "
             f"quiet and beside one `while True: pass` process; seconds per block (median / min). {machine()}; "
             f"{versions('torch')}.", "",
             "| threads | quiet s | quiet / 2 threads | under load s | under load / 2 threads |",
             "|---|---|---|---|---|"]
    q2, l2 = statistics.median(quiet["2 threads"]), statistics.median(loaded["2 threads"])
    for k in methods:
        q, ld = statistics.median(quiet[k]), statistics.median(loaded[k])
        lines.append(f"| {k} | {q:.2f} / {min(quiet[k]):.2f} | {q / q2:.2f} | {ld:.2f} / {min(loaded[k]):.2f} | "
                     f"{ld / l2:.2f} |")
    body = "\n".join(lines) + "\n"
    print(body)
    append_report("GPTQ solves on a shared CPU (benchmarks/gptq_threads.py)", body)


if __name__ == "__main__":
    main()
