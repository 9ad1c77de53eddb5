"""GPTQ against round-to-nearest on SmolLM2-135M (or `--model`): held-out KL to the dense model and perplexity, every
block linear quantised, side by side in one run, plus GPTQ's time and peak RSS.

A config `B/0/gguf` rounds onto llama.cpp's GGML grid of B bits (`gpu.ggml.ggml_type`: Q4_K, or Q4_0 for rows that
are not multiples of 256, ...): RTN is `gguf`'s own quantiser (llama.cpp's reference rounding) and GPTQ rounds onto
the same grid. Both are then saved as GGUF files and their held-out perplexity is measured again in llama.cpp
itself (llama-cpp-python, in its own process), against the model's source GGUF file as the dense reference.

SmolLM2's bundled weights come from a Q4_1 GGUF (4-bit asymmetric, group 32), so its "dense" weights already lie
on a 4-bit grid: RTN with group 32 asymmetric lands back on it and is nearly lossless. That row is a sanity
check only; conclusions come from the other groupings (64, 128, symmetric) and 3 bits.

Calibration: BBC calibration articles (GPTQ's Hessians); quality: BBC held-out articles, never seen by GPTQ.
Appends to reports/BENCHMARKS.md and writes the table into reports/QUANT.md's GPTQ section.

Usage: python benchmarks/gptq.py [--model smollm2-135m] [--calib 32] [--calib-len 512] [--heldout 32]
                                 [--configs 4/128/asym,4/0/gguf,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, append_report, machine, versions  # noqa: E402

import lensbench as lb  # noqa: E402
from lensbench.compress.evaluate import EvalConfig, text_quality  # noqa: E402
from lensbench.compress.gptq import GPTQConfig, prepare  # noqa: E402
from lensbench.compress.formats.gguf import source_gguf  # noqa: E402
from lensbench.compress.plan import Plan, Quant  # noqa: E402
from lensbench.profiling import model_card  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

REPORT = Path(__file__).resolve().parent.parent / "reports" / "QUANT.md"
DEFAULT = "4/32/asym,4/128/asym,4/64/asym,4/128/sym,3/128/asym,3/64/asym"


def plan_for(model, bits: int, group: int, scheme: str, method: str) -> Plan:
    card = model_card(model)
    block = card["units"]["block"]
    return Plan.quantize(card, {block.format(i=i): Quant(bits, group, scheme, method) for i in range(model.n_layers)})


LLAMA_PPL = """
import json, sys
sys.path.insert(0, {here!r})
from _common import LLAMA_ONE_TOKEN_BATCHES, llama_logits, perplexity
from llama_cpp import Llama
lists = json.load(sys.stdin)
llm = Llama(sys.argv[1], logits_all=True, verbose=False, n_ctx=max(map(len, lists)) + 8, n_threads=2,
            **LLAMA_ONE_TOKEN_BATCHES)  # the same logits; a batched prompt dies on some hosts (see _common)
print(json.dumps(perplexity(llama_logits(llm, lists), lists)))
"""


def llama_cpp_perplexity(path: Path, lists: list[list[int]]) -> float:
    """Perplexity of the GGUF file at `path` on token lists, computed by llama.cpp in its own process."""
    code = LLAMA_PPL.format(here=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], input=json.dumps(lists), text=True,
                          capture_output=True, timeout=1800, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode:
        raise RuntimeError(f"llama.cpp failed on {path}: {proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1]))


def gguf_rows(model, plans: dict, heldout: list[str], seq_len: int) -> dict:
    """llama.cpp's held-out perplexity of each plan saved as GGUF, and of the model's source GGUF (dense)."""
    src = source_gguf(model)
    lists = [model.tokenize([t], max_length=seq_len).input_ids[0].tolist() for t in heldout]
    out = {"dense": llama_cpp_perplexity(src, lists)} if src else {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, plan in plans.items():
            saved = lb.compress(model, plan, format="gguf", out=Path(tmp) / key)
            out[key] = llama_cpp_perplexity(saved.path / saved.record["file"], lists)
            out[key + "_types"] = saved.record["tensor_types"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="a bundled causal model")
    ap.add_argument("--calib", type=int, default=32, help="BBC calibration articles for GPTQ")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration article")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--configs", default=DEFAULT, help="bits/group/scheme, comma-separated")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ in order of decreasing H_jj with static groups (the default, as in the library)")
    ap.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ's group ranges searched for the least H_jj-weighted error (the default, as in the "
                    "library); --no-clip: min-max")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    model = lb.load(args.model)
    calib = bbc_news("calibration", limit=args.calib)
    heldout = bbc_news("heldout", limit=args.heldout)
    cfg = EvalConfig(texts=args.heldout, seq_len=128)
    rows, in_cpp = [], []
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
            gcfg = GPTQConfig(seq_len=args.calib_len, act_order=args.act_order, clip=args.clip)
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
        if scheme == "gguf":
            cpp = gguf_rows(model, {"rtn": rtn_plan, "gptq": gptq_plan}, heldout, cfg.seq_len)
            gap_cpp = cpp["rtn"] - cpp.get("dense", float("nan"))
            in_cpp.append((item, cpp.get("dense", float("nan")), cpp["rtn"], cpp["gptq"],
                           (cpp["rtn"] - cpp["gptq"]) / gap_cpp if gap_cpp > 0 else float("nan"), cpp["gptq_types"]))
            print(f"{item} in llama.cpp: ppl dense {in_cpp[-1][1]:.2f}, RTN {cpp['rtn']:.2f}, GPTQ {cpp['gptq']:.2f}",
                  flush=True)
    load_end = os.getloadavg()[0]
    flags = f" --model {args.model}" if args.model != "smollm2-135m" else ""
    flags += f" --configs {args.configs}" if args.configs != DEFAULT else ""
    flags += ("" if args.act_order else " --no-act-order") + ("" if args.clip else " --no-clip")
    order = ("act-order (static groups)" if args.act_order else "no act-order") + (
        ", group ranges searched for the least H_jj-weighted error" if args.clip else ", min-max group ranges")
    head = (f"`python benchmarks/gptq.py --calib {args.calib} --calib-len {args.calib_len} --heldout {args.heldout}"
            f"{flags}` "
            f"in {(time.time() - t_all) / 60:.1f} min; {machine()}; {versions('torch', 'transformers')}; load average "
            f"{load:.1f} at the start, {load_end:.1f} at the end (above 2 means another job shared the cores, so the "
            f"GPTQ seconds are not a quiet measurement). Every block linear of {args.model} quantised; embedding "
            f"and head as loaded. GPTQ: {args.calib} BBC calibration articles of up to {args.calib_len} tokens, "
            f"dampening 0.01, lazy blocks of 128 columns, {order}, "
            f"sequential over blocks. Quality: {args.heldout} held-out BBC "
            f"articles, 128 tokens each. `gap closed` = (RTN ppl - GPTQ ppl) / (RTN ppl - dense ppl). The 4/32/asym "
            f"row is SmolLM2's source file's own grid (Q4_1): a sanity check, not evidence. `B/0/gguf`: llama.cpp's "
            f"GGML type for B bits, RTN = gguf's quantiser (llama.cpp's reference rounding).\n")
    lines = ["| bits/group/scheme | KL RTN | KL GPTQ | ppl RTN | ppl GPTQ | ppl dense | gap closed | layer error "
             "GPTQ/RTN | max damp | GPTQ s | GPTQ peak RSS rise |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.0%} | "
                     f"{r[7]:.3f} | {r[8]:g} | {r[9]:.0f} | {r[10]:.0f} MiB |")
    if in_cpp:
        lines += ["", "The GGUF rows saved as files and evaluated by llama.cpp (llama-cpp-python, its own process; "
                  f"same held-out articles, {cfg.seq_len} tokens each; dense = the model's source GGUF):", "",
                  "| config | ppl dense | ppl RTN | ppl GPTQ | gap closed | tensor types (GPTQ file) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.0%} | "
                  f"{', '.join(f'{k} {v}' for k, v in sorted(r[5].items()))} |" for r in in_cpp]
    body = head + "\n" + "\n".join(lines) + "\n"
    print(body)
    append_report(f"GPTQ vs round-to-nearest, {args.model} (benchmarks/gptq.py)", body)
    text = REPORT.read_text() if REPORT.exists() else "# Quantisation\n"
    marker = "\n## GPTQ against round-to-nearest\n"
    before, _, after = text.partition(marker)
    section, nxt, rest = after.partition("\n## ")  # the new run goes at the end of the GPTQ section
    text = (before.rstrip() + "\n" + marker + "\n" + (section.strip() + "\n\n" if section.strip() else "") + body
            + ("\n" + nxt + rest if nxt else ""))
    REPORT.write_text(text)


if __name__ == "__main__":
    main()
