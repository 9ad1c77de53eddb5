"""GPTQ against round-to-nearest on SmolLM2-135M: held-out KL to the dense model and perplexity, every block linear
quantised, side by side in one run, plus GPTQ's time and peak RSS.

SmolLM2's bundled weights come from a Q4_1 GGUF (4-bit asymmetric, group 32), so its "dense" weights already lie
on a 4-bit grid: RTN with group 32 asymmetric lands back on it and is nearly lossless. That row is a sanity
check only; conclusions come from the other groupings (64, 128, symmetric) and 3 bits.

Calibration: BBC calibration articles (GPTQ's Hessians); quality: BBC held-out articles, never seen by GPTQ.
Appends to reports/BENCHMARKS.md and writes the table into reports/QUANT.md's GPTQ section.

Usage: python benchmarks/gptq.py [--calib 32] [--calib-len 512] [--heldout 32] [--configs 4/128/asym,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, append_report, machine, versions  # noqa: E402

import lensbench as lb  # noqa: E402
from lensbench.compress.evaluate import EvalConfig, text_quality  # noqa: E402
from lensbench.compress.gptq import GPTQConfig, prepare  # noqa: E402
from lensbench.compress.plan import Plan, Quant  # noqa: E402
from lensbench.profiling import model_card  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

REPORT = Path(__file__).resolve().parent.parent / "reports" / "QUANT.md"
DEFAULT = "4/32/asym,4/128/asym,4/64/asym,4/128/sym,3/128/asym,3/64/asym"


def plan_for(model, bits: int, group: int, scheme: str, method: str) -> Plan:
    card = model_card(model)
    block = card["units"]["block"]
    return Plan.quantize(card, {block.format(i=i): Quant(bits, group, scheme, method) for i in range(model.n_layers)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32, help="BBC calibration articles for GPTQ")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration article")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--configs", default=DEFAULT, help="bits/group/scheme, comma-separated")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ in order of decreasing H_jj with static groups (the default, as in the library)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    model = lb.load("smollm2-135m")
    calib = bbc_news("calibration", limit=args.calib)
    heldout = bbc_news("heldout", limit=args.heldout)
    cfg = EvalConfig(texts=args.heldout, seq_len=128)
    rows = []
    t_all = time.time()
    for item in args.configs.split(","):
        bits, group, scheme = item.split("/")
        bits, group = int(bits), int(group)
        rtn_plan = plan_for(model, bits, group, scheme, "rtn")
        gptq_plan = plan_for(model, bits, group, scheme, "gptq")
        rtn = text_quality(model, rtn_plan, heldout, cfg)
        rss0 = psutil.Process().memory_info().rss
        t0 = time.time()
        with PeakRSS() as peak:
            gcfg = GPTQConfig(seq_len=args.calib_len, act_order=args.act_order)
            summary = prepare(model, gptq_plan.bind(model), calib, gcfg, progress=True)
        seconds = time.time() - t0
        gptq = text_quality(model, gptq_plan, heldout, cfg)
        dense = rtn["dense_perplexity"]
        gap = rtn["perplexity"] - dense
        closed = (rtn["perplexity"] - gptq["perplexity"]) / gap if gap > 0 else float("nan")
        rows.append((item, rtn["kl_to_dense"], gptq["kl_to_dense"], rtn["perplexity"], gptq["perplexity"], dense,
                     closed, summary["layer_error_vs_rtn"], summary["damp_max"], seconds,
                     (peak.peak - rss0) / 2**20))
        print(f"{item}: KL {rtn['kl_to_dense']:.4f} -> {gptq['kl_to_dense']:.4f}, ppl {rtn['perplexity']:.2f} -> "
              f"{gptq['perplexity']:.2f} (dense {dense:.2f}, gap closed {closed:.0%}); GPTQ {seconds:.0f} s",
              flush=True)
    load_end = os.getloadavg()[0]
    flags = f" --configs {args.configs}" if args.configs != DEFAULT else ""
    flags += "" if args.act_order else " --no-act-order"
    order = "act-order (static groups)" if args.act_order else "no act-order"
    head = (f"`python benchmarks/gptq.py --calib {args.calib} --calib-len {args.calib_len} --heldout {args.heldout}"
            f"{flags}` "
            f"in {(time.time() - t_all) / 60:.1f} min; {machine()}; {versions('torch', 'transformers')}; load average "
            f"{load:.1f} at the start, {load_end:.1f} at the end (above 2 means another job shared the cores, so the "
            f"GPTQ seconds are not a quiet measurement). Every block linear quantised (210 of SmolLM2-135M); embedding "
            f"and head float32. GPTQ: {args.calib} BBC calibration articles of up to {args.calib_len} tokens, "
            f"dampening 0.01, lazy blocks of 128 columns, {order}, "
            f"sequential over blocks. Quality: {args.heldout} held-out BBC "
            f"articles, 128 tokens each. `gap closed` = (RTN ppl - GPTQ ppl) / (RTN ppl - dense ppl). The 4/32/asym "
            f"row is the source file's own grid (Q4_1): a sanity check, not evidence.\n")
    lines = ["| bits/group/scheme | KL RTN | KL GPTQ | ppl RTN | ppl GPTQ | ppl dense | gap closed | layer error "
             "GPTQ/RTN | max damp | GPTQ s | GPTQ peak RSS rise |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.0%} | "
                     f"{r[7]:.3f} | {r[8]:g} | {r[9]:.0f} | {r[10]:.0f} MiB |")
    body = head + "\n" + "\n".join(lines) + "\n"
    print(body)
    append_report("GPTQ vs round-to-nearest, SmolLM2-135M (benchmarks/gptq.py)", body)
    text = REPORT.read_text() if REPORT.exists() else "# Quantisation\n"
    marker = "\n## GPTQ against round-to-nearest\n"
    before, _, after = text.partition(marker)
    text = before.rstrip() + "\n" + marker + "\n" + (after.strip() + "\n\n" if after.strip() else "") + body
    REPORT.write_text(text)


if __name__ == "__main__":
    main()
