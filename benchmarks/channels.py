"""All-heads composition scores on SmolLM2-135M: lensbench vs TransformerLens 4, same run.

lensbench computes Q, K and V composition for all head pairs *and* the per-singular-component
decomposition and null statistics; TransformerLens computes the full scores only
(`TransformerBridge.all_composition_scores` in compatibility mode). Rounds are interleaved.

Usage: python benchmarks/channels.py [--rounds 3]
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
from lensbench.analyses.channels import all_compositions  # noqa: E402

warnings.filterwarnings("ignore")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from transformer_lens.model_bridge import TransformerBridge

    model = lensbench.load("smollm2-135m")
    bridge = TransformerBridge.boot_transformers(model.card["local_dir"], device="cpu")
    bridge.enable_compatibility_mode()

    def tl():
        with torch.no_grad():
            return {m: bridge.all_composition_scores(m).scores for m in ("Q", "K", "V")}

    def ours():
        return all_compositions(model)

    a, b = ours(), tl()  # correctness first: same numbers
    L = model.n_layers
    later = np.triu(np.ones((L, L), dtype=bool), 1)[:, None, :, None]
    diff = max(float(np.abs(np.where(later, a[m].scores - b[m].double().numpy(), 0)).max()) for m in "QKV")
    times = interleaved({"TransformerLens 4 all_composition_scores (Q, K, V)": tl,
                         "lensbench all_compositions (Q, K, V + components + null)": ours}, args.rounds)
    rows = ratio_rows(times, "TransformerLens 4 all_composition_scores (Q, K, V)")
    lines = [f"SmolLM2-135M, 30 layers x 9 heads (GQA 3 KV heads), all pairs, {args.rounds} interleaved rounds. "
             f"{machine()}. Versions: {versions('lensbench', 'torch', 'transformer-lens')}.", "",
             *ratio_table(rows, "TL")]
    speedup = 1 / rows[1][5]
    lines += ["", f"Max |difference| of the scores over later-layer pairs: {diff:.2e}. "
              f"Speed-up vs TransformerLens (paired): {speedup:.2f}x; goal >= 2x "
              f"{'met' if speedup >= 2 else 'NOT met'}."]
    text = "\n".join(lines)
    print(text)
    append_report("Composition scores (benchmarks/channels.py)", text)


if __name__ == "__main__":
    main()
