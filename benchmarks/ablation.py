"""Ablation scan on SmolLM2-135M: prefix-reusing scan vs the naive one-forward-per-unit scan, same run.

Both compute KL(dense || without unit) for all 30 blocks, 30 attention and 30 MLP sublayers on the
same held-in BBC texts, starting from the token ids (the dense forward is inside both timings).
Rounds are interleaved; the goal from issue 3 is <= 0.6x the naive scan's time.

Usage: python benchmarks/ablation.py [--rounds 3] [--texts 2] [--seq-len 128]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, interleaved, machine, ratio_rows, ratio_table, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench.analyses.ablation import naive_scan, units_for  # noqa: E402
from lensbench.replay import DenseRun, removed_states, token_scores  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

warnings.filterwarnings("ignore")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = lensbench.load("smollm2-135m")
    batch = model.tokenize(bbc_news("calibration", limit=args.texts), max_length=args.seq_len)
    units = units_for(model, ("block", "attn", "mlp"))

    def ours():
        dense = DenseRun.from_batch(model, batch)
        return np.array([float(token_scores(model, dense, removed_states(model, dense, [u]))[0].mean())
                         for u in units])

    def naive():
        return naive_scan(model, batch, units)

    a, b = ours(), naive()
    diff = np.abs(a - b)
    rel = float(np.max(diff / np.maximum(np.abs(b), 1e-3)))
    base = "naive scan (one full forward per unit)"
    times = interleaved({base: naive, "lensbench prefix-reusing scan": ours}, args.rounds)
    rows = ratio_rows(times, base)
    lines = [f"SmolLM2-135M, {len(units)} units (30 blocks, 30 attention, 30 MLP), {args.texts} BBC calibration "
             f"texts x {args.seq_len} tokens ({batch.n_tokens} tokens), {args.rounds} interleaved rounds. "
             f"{machine()}. Versions: {versions('lensbench', 'torch', 'transformers')}.", "",
             *ratio_table(rows, "naive")]
    ratio = rows[1][5]
    lines += ["", f"Per-unit KL of the two scans: max absolute difference {diff.max():.1e} nats, max relative "
              f"{rel:.1e} (KL range {b.min():.2e}..{b.max():.2f}). "
              f"Time ratio (paired): {ratio:.3f}; goal <= 0.6 {'met' if ratio <= 0.6 else 'NOT met'}."]
    text = "\n".join(lines)
    print(text)
    append_report("Ablation scan (benchmarks/ablation.py)", text)


if __name__ == "__main__":
    main()
