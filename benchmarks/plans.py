"""Plans on SmolLM2-135M: quality vs layers removed per ranking, attention vs block drop, the evolutionary
search vs one-shot rankings, and the decode speed-up of skipping layers — all on held-out BBC text.

Needs the profile made by
    lensbench profile smollm2-135m --analyses redundancy,ablation,skip_effect,geometry \
        --out reports/plans-smollm2/profile
Writes reports/PLANS.md, reports/plans-smollm2/{quality.csv,quality.html,*.plan.json,*.eval.json} and
appends the speed measurements to reports/BENCHMARKS.md. Evolutionary plans are kept and reused.

Usage: python benchmarks/plans.py [--ks 2,4,6,8,10] [--generations 20] [--heldout 32] [--speed-rounds 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, machine, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench.compress.evaluate import EvalConfig, speed_ratios, text_quality  # noqa: E402
from lensbench.compress.plan import Plan  # noqa: E402
from lensbench.compress.policies import make_plan  # noqa: E402
from lensbench.profiles import Profile  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent / "reports"
OUT = ROOT / "plans-smollm2"
RANKINGS = ("redundancy", "ablation", "geometry", "skip")
N_RANDOM = 5


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="2,4,6,8,10")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--speed-rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ks = [int(k) for k in args.ks.split(",")]
    model = lensbench.load("smollm2-135m")
    profile = Profile.load(OUT / "profile", model=model)
    calib = bbc_news("calibration", limit=16)  # the profile's calibration texts (2048 tokens)
    heldout = bbc_news("heldout", limit=args.heldout)
    cfg = EvalConfig(texts=args.heldout, speed_rounds=args.speed_rounds, decode_tokens=32)
    t0 = time.time()

    def quality(plan: Plan) -> dict:
        return text_quality(model, plan.resolve(model), heldout, cfg)

    def evo_plan(budget: int, kind: str) -> Plan:
        path = OUT / f"evo-{kind}-{budget}.plan.json"
        if path.exists():
            return Plan.load(path)
        plan = make_plan("evo", profile, budget, model=model, texts=calib, kind=kind,
                         generations=args.generations, progress=True)
        plan.save(path)
        return plan

    # 1. quality vs blocks removed, per ranking
    rows, dense_ppl = [], None
    for k in ks:
        plans = {r: make_plan("drop-block", profile, k, ranking=r) for r in RANKINGS}
        plans["evolutionary"] = evo_plan(k, "block")
        for name, plan in plans.items():
            q = quality(plan)
            dense_ppl = q["dense_perplexity"]
            rows.append({"ranking": name, "blocks_removed": k, "kl_to_dense": q["kl_to_dense"],
                         "perplexity": q["perplexity"], "units": " ".join(str(u) for u in plan.units())})
            print(f"k={k} {name:12s} KL {q['kl_to_dense']:.3f} ppl {q['perplexity']:.1f}", flush=True)
        rand = [quality(make_plan("drop-block", profile, k, ranking="random", seed=s)) for s in range(N_RANDOM)]
        rows.append({"ranking": f"random (mean of {N_RANDOM})", "blocks_removed": k,
                     "kl_to_dense": statistics.mean(r["kl_to_dense"] for r in rand),
                     "perplexity": statistics.mean(r["perplexity"] for r in rand), "units": ""})
        print(f"k={k} random       KL {rows[-1]['kl_to_dense']:.3f}", flush=True)

    # 2. 25% of attention sublayers by ranking vs random vs 25% of blocks by block redundancy
    quarter = round(0.25 * model.n_layers)
    attn = {}
    for r in ("ablation", "redundancy"):
        attn[f"attention, {r} ranking"] = quality(make_plan("drop-attn", profile, quarter, ranking=r))
    rand = [quality(make_plan("drop-attn", profile, quarter, ranking="random", seed=s)) for s in range(N_RANDOM)]
    attn[f"attention, random (mean of {N_RANDOM})"] = {k: statistics.mean(r[k] for r in rand)
                                                       for k in ("kl_to_dense", "perplexity")}
    attn["blocks, redundancy ranking"] = quality(make_plan("drop-block", profile, quarter, ranking="redundancy"))

    # 3. evolutionary search vs the one-shot rankings at the same budget (sublayers: k attention + k MLP)
    evo_sub = evo_plan(quarter // 2, "sublayer")
    sub_rows = {"evolutionary": quality(evo_sub)}
    for r in ("ablation", "redundancy"):
        one = make_plan("drop-attn", profile, quarter // 2, ranking=r).units() + \
            make_plan("drop-mlp", profile, quarter // 2, ranking=r).units()
        sub_rows[f"one-shot {r}"] = quality(Plan.drop(profile.model, one))

    # 4. decode speed-up of skipping k of 30 layers (balanced skip; the same count by the ablation ranking)
    speed = []
    for k in (6, 10):
        r = model.n_layers / (model.n_layers - k)
        for policy in ("balanced-skip", "ranking-skip"):
            plan = make_plan(policy, profile, r, ranking="ablation") if policy == "ranking-skip" \
                else make_plan(policy, profile, r)
            s = speed_ratios(model, plan.resolve(model), heldout[0], cfg)
            q = quality(plan)
            speed.append({"k": k, "policy": policy, "goal": 0.9 * r, **{x: s[x] for x in (
                "decode_speed_ratio", "prefill_speed_ratio", "decode_tokens_per_s", "prefill_tokens_per_s")},
                "kl_to_dense": q["kl_to_dense"], "perplexity": q["perplexity"]})
            print(f"skip {k} {policy}: decode x{s['decode_speed_ratio']:.3f} (goal {0.9 * r:.3f})", flush=True)

    write(rows, attn, sub_rows, speed, dense_ppl, quarter, evo_sub, args, time.time() - t0)


def write(rows, attn, sub_rows, speed, dense_ppl, quarter, evo_sub, args, seconds):
    import pandas as pd
    import plotly.express as px

    OUT.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(OUT / "quality.csv", index=False)
    fig = px.line(frame, x="blocks_removed", y="kl_to_dense", color="ranking", markers=True, log_y=True,
                  title="SmolLM2-135M: KL to the dense model on held-out BBC news vs blocks removed")
    fig.write_html(OUT / "quality.html", include_plotlyjs="cdn")
    table = frame.pivot(index="blocks_removed", columns="ranking", values="kl_to_dense")
    ppl = frame.pivot(index="blocks_removed", columns="ranking", values="perplexity")
    search = evo_sub.meta.get("search", {})
    lines = ["# Plans on SmolLM2-135M: what removing layers costs", "",
             f"Generated by `python benchmarks/plans.py --ks {args.ks} --generations {args.generations} "
             f"--heldout {args.heldout}` in {seconds / 60:.0f} min. Profile: `reports/plans-smollm2/profile` "
             "(16 BBC calibration texts x 128 tokens). Quality on "
             f"{args.heldout} held-out BBC articles x 128 tokens (never the calibration split); dense perplexity "
             f"{dense_ppl:.2f}. KL = KL(p_dense || p_plan) in nats per token. Versions: "
             f"{versions('lensbench', 'torch', 'transformers')}.", "",
             "## KL to dense vs whole blocks removed (of 30)", "", _md(table, "{:.3f}"), "",
             "## Perplexity vs whole blocks removed", "", _md(ppl, "{:.1f}"), "",
             "Plot: `reports/plans-smollm2/quality.html`; rows with the removed units: `quality.csv`.", "",
             f"## Removing 25% ({quarter}) of attention sublayers vs 25% of blocks", "",
             "| what is removed | KL to dense | perplexity |", "|---|---|---|"]
    lines += [f"| {k} | {v['kl_to_dense']:.4f} | {v['perplexity']:.2f} |" for k, v in attn.items()]
    lines += ["", f"## Evolutionary search vs one-shot rankings ({quarter // 2} attention + {quarter // 2} MLP "
              "sublayers)", "",
              f"EvoPress-style search: {search.get('full_evaluations')} full-calibration evaluations (2048 tokens) "
              f"and {search.get('minibatch_evaluations')} minibatch evaluations (256 tokens), "
              f"{search.get('tokens_forwarded')} tokens forwarded in all, started from the one-shot rankings. "
              f"Removes: {', '.join(str(u) for u in evo_sub.units())}.", "",
              "| plan | KL to dense (held-out) | perplexity |", "|---|---|---|"]
    lines += [f"| {k} | {v['kl_to_dense']:.4f} | {v['perplexity']:.2f} |" for k, v in sub_rows.items()]
    speed_lines = ["| skipped layers | policy | decode x dense | goal 0.9x30/(30-k) | prefill x dense | "
                   "decode tok/s dense -> plan | KL | perplexity |", "|---|---|---|---|---|---|---|---|"]
    for s in speed:
        d = s["decode_tokens_per_s"]
        speed_lines.append(f"| {s['k']} | {s['policy']} | {s['decode_speed_ratio']:.3f} | {s['goal']:.3f} "
                           f"{'met' if s['decode_speed_ratio'] >= s['goal'] else 'NOT met'} | "
                           f"{s['prefill_speed_ratio']:.3f} | {d['dense']:.1f} -> {d['plan']:.1f} | "
                           f"{s['kl_to_dense']:.3f} | {s['perplexity']:.1f} |")
    speed_head = (f"Batch 1, prompt 128 tokens, 32 greedy decode steps with the KV cache; {args.speed_rounds} "
                  f"interleaved rounds (dense and plan in shuffled order); ratio = median of per-round ratios. "
                  f"{machine()}.")
    lines += ["", "## Decode speed-up of skipping layers", "", speed_head, "", *speed_lines, ""]
    (ROOT / "PLANS.md").write_text("\n".join(lines) + "\n")
    append_report("Skipping layers: decode and prefill speed (benchmarks/plans.py)",
                  f"SmolLM2-135M. {speed_head} Versions: {versions('lensbench', 'torch', 'transformers')}.\n\n"
                  + "\n".join(speed_lines))
    print("\n".join(lines))


def _md(frame, fmt: str) -> str:
    cols = list(frame.columns)
    out = ["| blocks removed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, row in frame.iterrows():
        out.append(f"| {k} | " + " | ".join(fmt.format(row[c]) for c in cols) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
