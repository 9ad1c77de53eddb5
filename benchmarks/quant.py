"""Mixed precision on SmolLM2-135M, held-out BBC text: bytes of packed models, sensitivity-driven bit
allocation vs uniform / reverse / random at equal average bits, the LayerwiseQuant curve (quality vs
fraction of blocks moved to the lower bit-width, ranked vs random order), and decode speed.

Needs (made if missing, ~5 min; per block only — a per-linear scan at four bit-widths is 8x the
forwards, ~45 min on 2 cores):
    lensbench profile smollm2-135m --analyses redundancy,quant_sensitivity,weight_outliers \
        --out reports/quant-smollm2/profile
Headline plans are evaluated with the packed weights (`apply`); the curve points use the same
quantisation simulated in place (numerically the packed model, tested) so that ~130 points stay cheap.
Writes reports/QUANT.md, reports/quant-smollm2/{allocation.csv,curve.csv,curve.html,*.plan.json} and
appends bytes and speed to reports/BENCHMARKS.md.

Each part saves its rows (bytes.csv, allocation.csv, curve.csv) as it finishes; `--parts` runs only
some parts and takes the others from those files, so a long study can be resumed.

Usage: python benchmarks/quant.py [--heldout 32] [--speed-rounds 7] [--step 3] [--pairs 4-3,4-2,8-4]
                                  [--parts bytes,allocation,curve,speed]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, machine, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench.compress.apply import apply  # noqa: E402
from lensbench.surgery import weight_bytes  # noqa: E402
from lensbench.compress.policies.bits import block_order  # noqa: E402
from lensbench.capture import batches  # noqa: E402
from lensbench.compress.evaluate import EvalConfig, batch_scores, speed_ratios, text_quality  # noqa: E402
from lensbench.compress.plan import Plan  # noqa: E402
from lensbench.compress.policies import make_plan  # noqa: E402
from lensbench.profiles import Profile  # noqa: E402
from lensbench.profiling import model_card, profile_model  # noqa: E402
from lensbench.simquant import block_linears, simulated  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent / "reports"
OUT = ROOT / "quant-smollm2"
GROUP = 128
SEEDS = (0, 1, 2)


class HeldoutKL:
    """KL to dense and perplexity on held-out text with quantisation simulated; dense log-probs cached."""

    def __init__(self, model, texts, seq_len=128, batch_size=8):
        self.model = model
        self.batches = list(batches(model, texts, batch_size, seq_len))
        self.dense = []
        with torch.no_grad():
            for b in self.batches:
                self.dense.append(torch.log_softmax(model.module(**b.model_inputs()).logits[b.content_mask].float(),
                                                    -1))
        self.cache: dict = {}

    def __call__(self, bits_of_block: dict[int, int]) -> dict:
        ad = self.model.adapter
        targets = {f"{ad.block_path(i)}.{n}": (b, GROUP) for i, b in bits_of_block.items()
                   for n in block_linears(self.model)}
        kl = nll = 0.0
        n_kl = n_next = 0
        with torch.no_grad(), simulated(self.model, targets, self.cache):
            for b, logp in zip(self.batches, self.dense, strict=True):
                logq = torch.log_softmax(self.model.module(**b.model_inputs()).logits[b.content_mask].float(), -1)
                s = batch_scores(b, logp, logq)
                kl, nll, n_kl, n_next = kl + s["kl"], nll + s["nll"], n_kl + s["n_kl"], n_next + s["n_next"]
        return {"kl_to_dense": kl / n_kl, "perplexity": float(np.exp(nll / n_next))}


def ensure_profile(model) -> Profile:
    path = OUT / "profile"
    if (path / "profile.json").is_file():
        return Profile.load(path, model=model)
    texts = bbc_news("calibration", limit=16)
    prof = profile_model(model, texts, analyses=["redundancy", "quant_sensitivity", "weight_outliers"],
                         batch_size=8, seq_len=128, data={"source": "bbc_news calibration split, 16 texts"},
                         analysis_params={"quant_sensitivity": {"bits": (2, 3, 4, 8), "group_size": GROUP,
                                                                "per_linear": False}})
    prof.save(path)
    return prof


def full_model_plan(model, bits: int) -> Plan:
    """Every linear and the (tied) embedding at `bits`: the whole model packed."""
    names = {n: (bits, GROUP) for n, m in model.module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    return Plan.quantize(model_card(model), names, policy={"name": f"uniform-int{bits}-all"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--speed-rounds", type=int, default=7)
    ap.add_argument("--step", type=int, default=3, help="curve: blocks moved per point")
    ap.add_argument("--pairs", default="4-3,4-2,8-4", help="curve: high-low bit pairs")
    ap.add_argument("--parts", default="bytes,allocation,curve,speed")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    t0 = time.time()
    model = lensbench.load("smollm2-135m")
    L = model.n_layers
    prof = ensure_profile(model)
    print(f"profile ready ({time.time() - t0:.0f} s)", flush=True)
    heldout = bbc_news("heldout", limit=args.heldout)
    cfg = EvalConfig(texts=args.heldout, speed_rounds=args.speed_rounds, decode_tokens=32)

    # 1. bytes and quality of whole-model packed int8 / int4 (real packed weights)
    params = sum(p.numel() for p in model.module.parameters())
    fp16 = 2 * params
    sizes = _read(OUT / "bytes.csv") if "bytes" not in parts else []
    for bits in ((8, 4) if "bytes" in parts else ()):
        plan = full_model_plan(model, bits)
        with apply(model, plan):
            wb = weight_bytes(model.module)
        q = text_quality(model, plan, heldout, cfg)
        sizes.append({"bits": bits, "weight_mib": wb / 2**20, "ratio": wb / fp16, "kl_to_dense": q["kl_to_dense"],
                      "perplexity": q["perplexity"]})
        print(f"int{bits} whole model: {wb / 2**20:.1f} MiB = {wb / fp16:.3f} x fp16; KL {q['kl_to_dense']:.4f}",
              flush=True)
    if "bytes" in parts:
        _csv(OUT / "bytes.csv", sizes)

    # 2. equal average bits: allocations, evaluated with packed weights
    rows = _read(OUT / "allocation.csv") if "allocation" not in parts else []

    def run(label, budget, plan):
        q = text_quality(model, plan, heldout, cfg)
        rows.append({"budget": budget, "allocation": label, "average_bits": plan.predicted.get("average_bits"),
                     "kl_to_dense": q["kl_to_dense"], "perplexity": q["perplexity"]})
        print(f"{budget} {label:28s} avg {rows[-1]['average_bits']:.3f} KL {q['kl_to_dense']:.4f} "
              f"ppl {q['perplexity']:.2f}", flush=True)
        return plan

    levels = {3.0: "4,3", 3.5: "4,3", 4.0: "8,4", 4.5: "8,4"} if "allocation" in parts else {}
    for budget, lv in levels.items():
        for ranking in ("lim", "zd", "quant"):
            run(f"rank {ranking} ({lv})", budget, make_plan("bits-rank", prof, budget, ranking=ranking, levels=lv,
                                                            group_size=GROUP))
        run(f"reverse quant ({lv})", budget, make_plan("bits-rank", prof, budget, ranking="quant", levels=lv,
                                                       group_size=GROUP, reverse=True))
        rand = [text_quality(model, make_plan("bits-rank", prof, budget, ranking="random", seed=s, levels=lv,
                                              group_size=GROUP), heldout, cfg) for s in SEEDS]
        avg = make_plan("bits-rank", prof, budget, ranking="random", levels=lv, group_size=GROUP)
        rows.append({"budget": budget, "allocation": f"random ({lv}), mean of {len(SEEDS)}",
                     "average_bits": avg.predicted["average_bits"],
                     "kl_to_dense": statistics.mean(r["kl_to_dense"] for r in rand),
                     "perplexity": statistics.mean(r["perplexity"] for r in rand)})
        print(f"{budget} random mean KL {rows[-1]['kl_to_dense']:.4f}", flush=True)
        plan = run("dp per block (2,3,4,8)", budget, make_plan("bits-dp", prof, budget, group_size=GROUP))
        plan.save(OUT / f"dp-block-{budget}.plan.json")
        if budget == int(budget):
            b = int(budget)
            uni = Plan.quantize(prof.model, {prof.model["units"]["block"].format(i=i): (b, GROUP) for i in range(L)},
                                predicted={"average_bits": float(b)})
            run(f"uniform int{b}", budget, uni)

    if "allocation" in parts:
        _csv(OUT / "allocation.csv", rows)

    # 3. LayerwiseQuant curve: n blocks moved from hi to lo, ranked vs random order (simulated quantisation)
    curve = _read(OUT / "curve.csv") if "curve" not in parts else []
    ev = HeldoutKL(model, heldout) if "curve" in parts else None
    pairs = [tuple(int(b) for b in p.split("-")) for p in args.pairs.split(",")] if "curve" in parts else []
    for hi, lo in pairs:
        orders = {r: block_order(prof, r, lo) for r in ("lim", "zd", "quant")}
        orders |= {f"random{s}": block_order(prof, "random", lo, seed=s) for s in SEEDS}
        for n in range(0, L + 1, args.step):
            for name, order in orders.items():
                low = set(order[:n])
                q = ev({i: (lo if i in low else hi) for i in range(L)})
                curve.append({"hi": hi, "lo": lo, "n_low": n, "order": name, **q})
            print(f"curve int{hi}->int{lo} n={n}: " + ", ".join(
                f"{c['order']} {c['kl_to_dense']:.3f}" for c in curve[-len(orders):]), flush=True)

    if "curve" in parts:
        _csv(OUT / "curve.csv", curve)

    # 4. decode speed of the whole-model packed int8 / int4 vs dense float32 (same run, interleaved)
    speed = []
    for bits in ((8, 4) if "speed" in parts else ()):
        s = speed_ratios(model, full_model_plan(model, bits), heldout[0], cfg)
        speed.append({"bits": bits, **{k: s[k] for k in ("decode_speed_ratio", "prefill_speed_ratio",
                                                         "decode_tokens_per_s", "prefill_tokens_per_s")}})
        print(f"int{bits} decode x{s['decode_speed_ratio']:.3f}, prefill x{s['prefill_speed_ratio']:.3f}", flush=True)
    dense_ppl = text_quality(model, [], heldout, cfg)["dense_perplexity"]
    write(sizes, rows, curve, speed, dense_ppl, args, time.time() - t0, prof)


def _read(path: Path) -> list[dict]:
    """Rows a previous run saved (numbers back as floats, blanks as None)."""
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v != "" else None
                except ValueError:
                    row[k] = v
            out.append(row)
    return out


def _csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _curve_plot(curve: list[dict]) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = sorted({(c["hi"], c["lo"]) for c in curve}, reverse=True)
    fig = make_subplots(1, len(pairs), subplot_titles=[f"int{h} -> int{lo}" for h, lo in pairs])
    for col, (hi, lo) in enumerate(pairs, 1):
        pts = [c for c in curve if (c["hi"], c["lo"]) == (hi, lo)]
        for order in ("lim", "zd", "quant"):
            xs = [c for c in pts if c["order"] == order]
            fig.add_trace(go.Scatter(x=[c["n_low"] / 30 for c in xs], y=[c["kl_to_dense"] for c in xs],
                                     mode="lines+markers", name=f"{order} order", legendgroup=order,
                                     showlegend=col == 1), 1, col)
        ns = sorted({c["n_low"] for c in pts})
        mean = [statistics.mean(c["kl_to_dense"] for c in pts if c["n_low"] == n and c["order"].startswith("random"))
                for n in ns]
        fig.add_trace(go.Scatter(x=[n / 30 for n in ns], y=mean, mode="lines+markers", name="random order (mean)",
                                 legendgroup="random", showlegend=col == 1, line={"dash": "dash"}), 1, col)
        fig.update_xaxes(title_text="fraction of blocks at the lower bit-width", row=1, col=col)
    fig.update_yaxes(title_text="KL to dense on held-out BBC (nats/token)", type="log", row=1, col=1)
    fig.update_layout(title="SmolLM2-135M: quality vs blocks moved to fewer bits (LayerwiseQuant)", height=450,
                      width=1300)
    fig.write_html(OUT / "curve.html", include_plotlyjs="cdn")


def _num(v) -> str:
    return "not recorded" if v is None or v == "" else f"{float(v):.2f}"


def _holds_until(curve, hi, lo, order, tol):
    """Largest fraction of blocks at `lo` with KL <= tol x the all-`hi` KL (for one order, or random mean)."""
    pts = [c for c in curve if (c["hi"], c["lo"]) == (hi, lo)]
    ns = sorted({c["n_low"] for c in pts})

    def kl(n):
        sel = [c["kl_to_dense"] for c in pts if c["n_low"] == n and
               (c["order"] == order or (order == "random" and c["order"].startswith("random")))]
        return statistics.mean(sel)

    base = kl(0)
    best = 0
    for n in ns:
        if kl(n) <= tol * base:
            best = n
        else:
            break
    return best / 30


def write(sizes, rows, curve, speed, dense_ppl, args, seconds, prof):
    OUT.mkdir(parents=True, exist_ok=True)
    _csv(OUT / "allocation.csv", rows)
    _csv(OUT / "curve.csv", curve)
    _curve_plot(curve)
    lines = ["# Mixed precision on SmolLM2-135M", "",
             f"Made by `python benchmarks/quant.py --heldout {args.heldout} --speed-rounds {args.speed_rounds} "
             f"--step {args.step}` in {seconds / 60:.0f} min; {machine()}; "
             f"{versions('lensbench', 'torch', 'transformers', 'numba')}. Quantisation: round-to-nearest, group-wise "
             f"asymmetric, group {GROUP}, float16 scales and mins (lensbench's packed format). Quality: KL(dense || "
             f"quantised) per token and perplexity on {args.heldout} held-out BBC news articles (128 tokens each; "
             f"dense perplexity {dense_ppl:.2f}). Sensitivities were measured on the 16-text calibration split "
             f"(`reports/quant-smollm2/profile`).", "",
             "## Bytes of packed models", "",
             "All linear layers and the tied embedding/LM head packed; norms stay float32. Bytes are measured from "
             "the tensors the model holds, against 2 bytes per parameter.", "",
             "| packing | weight bytes | x fp16 | goal | KL to dense | perplexity |", "|---|---|---|---|---|---|"]
    for s in sizes:
        goal = 0.3 if int(s["bits"]) == 4 else 0.55
        lines.append(f"| int{int(s['bits'])} g{GROUP} | {s['weight_mib']:.1f} MiB | {s['ratio']:.3f} | "
                     f"<= {goal} {'met' if s['ratio'] <= goal else 'NOT met'} | {s['kl_to_dense']:.4f} | "
                     f"{_num(s['perplexity'])} |")
    lines += ["", "## Equal average bits: allocation vs uniform, reverse and random", "",
              "Budget = average weight bits over the 210 block linears (embedding and head stay float32 here). "
              "`rank X (hi,lo)` = LayerwiseQuant rank-and-threshold by ranking X (lim = block cosine, zd = weight "
              "outliers, quant = measured KL of the block at the low bit-width); `reverse` = the most sensitive "
              "blocks low; `dp` = knapsack on the measured per-unit KLs over {2,3,4,8}. Evaluated with packed "
              "weights.", "", "| budget | allocation | average bits | KL to dense | perplexity |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['allocation']} | {r['average_bits']:.3f} | {r['kl_to_dense']:.4f} | "
                     f"{_num(r['perplexity'])} |")
    lines += ["", "## LayerwiseQuant curve: ranked vs random order", "",
              "KL to dense as blocks move from the high to the low bit-width, least important first by each "
              "ranking, and in random orders (mean of 3). `reports/quant-smollm2/curve.html` plots it; "
              "`curve.csv` has every point. \"Holds until\" = the largest fraction of blocks at the low bit-width "
              "with KL within 2x of the all-high model.", "",
              "| levels | lim holds until | zd | quant | random (mean) |", "|---|---|---|---|---|"]
    for hi, lo in sorted({(c["hi"], c["lo"]) for c in curve}, reverse=True):
        lines.append(f"| int{hi} -> int{lo} | " + " | ".join(f"{_holds_until(curve, hi, lo, o, 2.0):.2f}"
                                                            for o in ("lim", "zd", "quant", "random")) + " |")
    lines += ["", "## Decode speed of the packed models", "",
              f"Batch 1, prompt 128 tokens, 32 greedy decode steps with the KV cache, {args.speed_rounds} interleaved "
              "rounds against the dense float32 model; numba CPU kernels.", "",
              "| packing | decode x dense | prefill x dense | decode tokens/s (dense -> packed) |", "|---|---|---|---|"]
    for s in speed:
        d = s["decode_tokens_per_s"]
        lines.append(f"| int{s['bits']} (whole model) | {s['decode_speed_ratio']:.3f} | {s['prefill_speed_ratio']:.3f} "
                     f"| {d['dense']:.1f} -> {d['plan']:.1f} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "QUANT.md").write_text(text)
    append_report("Packed SmolLM2: bytes and decode speed (benchmarks/quant.py)",
                  "\n".join(lines[lines.index("## Bytes of packed models") + 1:
                                  lines.index("## Equal average bits: allocation vs uniform, reverse and random")]
                            + lines[lines.index("## Decode speed of the packed models") + 1:]))
    print(text)


if __name__ == "__main__":
    main()
