"""Vectorised layer-wise probes vs the scikit-learn per-layer loop, same run, on SmolLM2-135M.

Task: 2,000 examples (1,000 per class) of a real probe task; features: the paper's tap (normalised
mid-block state, last token) for all 30 layers, captured once into an activation store (the second
capture is timed too: it reads the store). Both trainers run the same protocol (stratified 80/20
split, 5-fold CV over 5 values of C, refit, test metrics) for one seed, alternating over rounds.
Goal (issue 5): agreement within 1 accuracy point per layer and >= 5x faster.

Usage: python benchmarks/probes.py [--task cities] [--rounds 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, machine, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench.probes.run import features  # noqa: E402
from lensbench.probes.tasks import load_task  # noqa: E402
from lensbench.probes.trainer import ProbeConfig, fit_probes, sklearn_reference  # noqa: E402

warnings.filterwarnings("ignore")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="cities")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = lensbench.load("smollm2-135m")
    task = load_task(args.task, 1000)
    cache = Path(tempfile.mkdtemp(prefix="lensbench-probes-"))
    t0 = time.perf_counter()
    X = features(model, task, cache)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    X2 = features(model, task, cache)
    second = time.perf_counter() - t0
    assert torch.equal(X, X2)
    cfg = ProbeConfig(seeds=(0,))
    times = {"vectorised": [], "sklearn": []}
    results = {}
    for r in range(args.rounds):
        order = ["vectorised", "sklearn"] if r % 2 == 0 else ["sklearn", "vectorised"]
        for name in order:
            t0 = time.perf_counter()
            results[name] = fit_probes(X, task.labels, cfg) if name == "vectorised" else \
                sklearn_reference(X.numpy(), task.labels, cfg)
            times[name].append(time.perf_counter() - t0)
            print(f"round {r} {name}: {times[name][-1]:.1f} s", flush=True)
    a, b = results["vectorised"].mean("accuracy"), results["sklearn"].mean("accuracy")
    diff = np.abs(a - b).max() * 100
    ratio = statistics.median(s / v for s, v in zip(times["sklearn"], times["vectorised"], strict=True))
    lines = [f"SmolLM2-135M, task `{args.task}` ({len(task)} examples), features [{X.shape[0]} layers, {X.shape[1]}, "
             f"{X.shape[2]}] (paper's tap, last token); protocol: stratified 80/20 split, 5-fold CV over C in "
             f"{list(cfg.Cs)}, refit, 1 seed; {args.rounds} alternating rounds; {machine()}; "
             f"{versions('lensbench', 'torch', 'scikit-learn')}.", "",
             "| trainer | median s | min s |", "|---|---|---|"]
    for k, v in times.items():
        lines.append(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f} |")
    lines += ["", f"Speed-up of the vectorised trainer: x{ratio:.1f} (median of per-round ratios; goal >= 5x: "
              f"{'met' if ratio >= 5 else 'NOT met'}). Largest per-layer accuracy difference: {diff:.2f} points "
              f"(goal <= 1: {'met' if diff <= 1 else 'NOT met'}); best C equal on "
              f"{(results['vectorised'].best_C == results['sklearn'].best_C).mean():.0%} of layers.",
              f"Activations: first capture {first:.1f} s; second run on the same model and data {second:.2f} s "
              f"(read from the store, identical tensors).", "",
              "Accuracy per layer (vectorised / sklearn): "
              + ", ".join(f"{i}: {x:.3f}/{y:.3f}" for i, (x, y) in enumerate(zip(a, b, strict=True)))]
    body = "\n".join(lines)
    print(body)
    append_report("Layer-wise probes: vectorised vs scikit-learn (benchmarks/probes.py)", body)


if __name__ == "__main__":
    main()
