"""Evolutionary bit allocation (evo-bits) on SmolLM2-135M at the budgets of benchmarks/quant.py, evaluated
with packed weights on the same held-out text; appends a section to reports/QUANT.md.

Usage: python benchmarks/quant_evo.py [--budgets 3.0,3.5,4.0,4.5] [--generations 20] [--heldout 32]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lensbench  # noqa: E402
from lensbench.compress.evaluate import EvalConfig, text_quality  # noqa: E402
from lensbench.compress.policies import make_plan  # noqa: E402
from lensbench.profiles import Profile  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent / "reports"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="3.0,3.5,4.0,4.5")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    model = lensbench.load("smollm2-135m")
    prof = Profile.load(ROOT / "quant-smollm2" / "profile", model=model)
    calib = bbc_news("calibration", limit=8)
    heldout = bbc_news("heldout", limit=args.heldout)
    cfg = EvalConfig(texts=args.heldout)
    lines = ["", "## Evolutionary bit allocation (evo-bits)", "",
             f"`python benchmarks/quant_evo.py --generations {args.generations}`: per block over {{2,3,4,8}}, seeded "
             "with uniform bits, the DP and rank-and-threshold allocations and random states; fitness = calibration "
             "KL on 8 BBC calibration texts (simulated quantisation); evaluated here with packed weights on the "
             "held-out texts above.", "",
             "| budget | average bits | KL to dense | perplexity | calibration KL: start (best seed) -> end | "
             "full / minibatch evaluations |", "|---|---|---|---|---|---|"]
    for b in (float(x) for x in args.budgets.split(",")):
        plan = make_plan("evo-bits", prof, b, model=model, texts=calib, generations=args.generations,
                         group_size=128, progress=True)
        plan.save(ROOT / "quant-smollm2" / f"evo-bits-{b}.plan.json")
        q = text_quality(model, plan, heldout, cfg)
        s = plan.meta["search"]
        best_seed = min(s["start_calibration_kl"], key=s["start_calibration_kl"].get)
        start = s["start_calibration_kl"][best_seed]
        lines.append(f"| {b} | {plan.predicted['average_bits']:.3f} | {q['kl_to_dense']:.4f} | {q['perplexity']:.2f} | "
                     f"{start:.4f} ({best_seed}) -> {plan.predicted['calibration_kl']:.4f} | "
                     f"{s['full_evaluations']} / {s['minibatch_evaluations']} |")
        print(lines[-1], flush=True)
    lines.append(f"\n({(time.time() - t0) / 60:.0f} min.)")
    with open(ROOT / "QUANT.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
