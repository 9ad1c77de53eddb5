"""Load and profile times on SmolLM2-135M: first (GGUF conversion) vs cached load, and the redundancy
profile of the demo's text (16 BBC texts x 128 tokens) vs the plain forward passes it needs.

Usage: python benchmarks/load_profile.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, interleaved, machine, ratio_rows, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench.capture import batches  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

warnings.filterwarnings("ignore")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LENSBENCH_CACHE"] = cache  # an empty cache: the first load converts the GGUF file
        t0 = time.perf_counter()
        lensbench.load("smollm2-135m")
        first = time.perf_counter() - t0
        cached = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            model = lensbench.load("smollm2-135m")
            cached.append(time.perf_counter() - t0)
    texts = bbc_news("calibration", limit=16)

    def forwards():
        with torch.no_grad():
            for batch in batches(model, texts, 8, 128):
                model.module(**batch.model_inputs())

    times = interleaved({"plain forward passes": forwards,
                         "profile_model (redundancy)": lambda: lensbench.profile_model(model, texts, progress=False)},
                        args.rounds)
    rows = ratio_rows(times, "plain forward passes")
    lines = [f"SmolLM2-135M. {machine()}. Versions: {versions('lensbench', 'torch', 'transformers', 'gguf')}.", "",
             f"- first load, empty cache (GGUF dequantisation and conversion): {first:.1f} s",
             f"- cached load: median {statistics.median(cached):.2f} s, min {min(cached):.2f} s "
             f"({args.rounds} loads)",
             f"- 16 BBC calibration texts x 128 tokens (2 batches of 8), {args.rounds} interleaved rounds:", "",
             "| | median s | min s | x forwards (paired) |", "|---|---|---|---|"]
    for name, med, mn, _, _, rpair in rows:
        lines.append(f"| {name} | {med:.2f} | {mn:.2f} | {rpair:.2f} |")
    text = "\n".join(lines)
    print(text)
    append_report("Load and profile times (benchmarks/load_profile.py)", text)


if __name__ == "__main__":
    main()
