"""The GPU path for real, in one script that finishes in a few minutes on one CUDA GPU:

(a) every packed matmul on CUDA against the float32 reference: bits 8/4 on the Triton kernel, 3/2 on the
    path dispatch takes for them (the reference: there is no Triton kernel for them), groups 32/64/128,
    odd shapes, float16 and bfloat16 activations, 1/7/64 rows;
(b) packed matmul vs torch float16 vs torchao int8/int4 weight-only at M=1 and M=512 on SmolLM2's linear
    shapes, 4096x4096 and 4096x14336 (both directions), CUDA-event timing, median of `--reps`;
(c) whole-model decode tokens/s of SmolLM2-135M: float16 vs lensbench int8 vs int4 (every linear, the LM
    head and the embedding, group 128);
(d) reports/GPU.md with the device, the versions and the numbers.

Without a GPU, `--dry-run` runs the same cases on tiny shapes on the CPU (imports, case lists, the
reference path, the report template, written to `--out`), so CI keeps it from rotting.

Usage: python benchmarks/gpu_check.py [--reps 50] [--decode 64] [--out reports/GPU.md] | --dry-run --out FILE
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import versions  # noqa: E402

from lensbench.gpu import dispatch, quant, reference  # noqa: E402

BITS = (8, 4, 3, 2)
GROUPS = (32, 64, 128)
ODD = [(1000, 1000), (4096, 4096), (11, 576), (1536, 200)]  # (N, K): K not a multiple of the group, N tiny
ROWS = (1, 7, 64)
DTYPES = {"fp16": (torch.float16, 3e-3), "bf16": (torch.bfloat16, 2e-2)}
SPEED = {"smollm2 q/o 576x576": (576, 576), "smollm2 k/v 192x576": (192, 576), "smollm2 gate/up 1536x576": (1536, 576),
         "smollm2 down 576x1536": (576, 1536), "smollm2 lm_head 49152x576": (49152, 576),
         "4096x4096": (4096, 4096), "up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336)}
SPEED_ROWS = (1, 512)


def correctness(device: str, dry: bool) -> list[dict]:
    """Max |packed - reference| / max |reference| for every case (shapes shrunk 16x in a dry run)."""
    out = []
    for bits in BITS:
        for gs in GROUPS:
            for n, k in ODD:
                if dry:
                    n, k = max(8, n // 16), max(8, k // 16)
                w = torch.randn(n, k) * 0.02
                pw = quant.quantize(w, bits, gs).to(device)
                for dname, (dt, tol) in DTYPES.items():
                    for m in ROWS:
                        x = torch.randn(m, k, device=device).to(dt)
                        ref = reference.matmul(x.float().cpu(), pw.to("cpu"))
                        y = (reference.matmul(x, pw) if dry else dispatch.matmul(x, pw)).float().cpu()
                        err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
                        out.append({"bits": bits, "group": gs, "shape": f"{n}x{k}", "dtype": dname, "rows": m,
                                    "kernel": "reference" if dry else dispatch.kernel_for(x, pw), "rel_err": err,
                                    "ok": err <= tol})
    return out


def _time(fn, reps: int, device: str) -> float:
    """Median seconds of fn: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def torchao_linear(w: torch.Tensor, bits: int):
    """A torchao int8/int4 weight-only linear of w (float16 on the device), or the reason it refused."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        quantize_(lin, Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=128))
        return lin
    except Exception as exc:  # noqa: BLE001 - a refusal is a result to report
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def speed(device: str, reps: int, dry: bool) -> tuple[list[dict], list[str]]:
    rows, notes = [], set()
    dt = torch.float16 if device == "cuda" else torch.float32
    for name, (n, k) in SPEED.items():
        if dry:
            n, k = max(16, n // 64), max(64, k // 64)
        w = (torch.randn(n, k) * 0.02).to(device)
        packed = {b: quant.quantize(w.cpu(), b, 128).to(device) for b in (8, 4)}
        ao = {} if dry else {b: torchao_linear(w, b) for b in (8, 4)}
        for m in SPEED_ROWS:
            m = min(m, 8) if dry else m
            x = torch.randn(m, k, device=device, dtype=dt)
            wt = w.to(dt)
            dense_ms = _time(lambda x=x, wt=wt: x @ wt.T, reps, device) * 1e3
            row = {"case": name, "shape": f"{n}x{k}", "M": m, "dense_ms": dense_ms}
            for b, pw in packed.items():
                row[f"int{b}_ms"] = _time(lambda pw=pw, x=x: dispatch.matmul(x, pw), reps, device) * 1e3
            for b, lin in ao.items():
                if isinstance(lin, str):
                    notes.add(f"torchao int{b}: {lin}")
                    continue
                xb = x.to(torch.bfloat16)
                row[f"torchao_int{b}_ms"] = _time(lambda lin=lin, xb=xb: lin(xb), reps, device) * 1e3
            rows.append(row)
    return rows, sorted(notes)


def decode(device: str, steps: int, dry: bool) -> list[dict]:
    """Whole-model greedy decode tokens/s, float16 vs the model packed at int8 and int4."""
    from torch import nn

    import lensbench
    from lensbench.compress.apply import apply
    from lensbench.compress.plan import Plan
    from lensbench.profiling import model_card

    if dry:
        from lensbench.testing import tiny_model
        model = tiny_model("llama")
    else:
        model = lensbench.load("smollm2-135m")
        model.module.to(device=device, dtype=torch.float16)
    names = [n for n, m in model.module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    ids = torch.randint(0, model.module.config.vocab_size, (1, 128), device=device)
    steps = 2 if dry else steps

    @torch.no_grad()
    def run() -> float:
        out = model.module(input_ids=ids, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model.module(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t0)

    dense = statistics.median(run() for _ in range(3))
    rows = [{"method": "float16" if device == "cuda" else "float32", "tokens_per_s": dense}]
    for bits in (8, 4):
        plan = Plan.quantize(model_card(model), {n: (bits, 128) for n in names})
        with apply(model, plan):
            run()
            rows.append({"method": f"int{bits} g128", "tokens_per_s": statistics.median(run() for _ in range(3))})
    return rows


def report(device_name: str, acc: list[dict], spd: list[dict], notes: list[str], dec: list[dict],
           seconds: float) -> str:
    bad = [r for r in acc if not r["ok"]]
    worst = {}
    for r in acc:
        key = (r["bits"], r["dtype"], r["kernel"])
        worst[key] = max(worst.get(key, 0.0), r["rel_err"])
    lines = ["# The GPU path on a real GPU (benchmarks/gpu_check.py)", "",
             f"Device: {device_name}. {seconds / 60:.1f} min. Versions: "
             + versions("lensbench", "torch", "triton", "torchao", "transformers"), "",
             f"## (a) Correctness: {len(acc) - len(bad)} of {len(acc)} cases within tolerance "
             "(fp16 3e-3, bf16 2e-2 of max |reference|)", "",
             "| bits | activations | kernel | worst relative error |", "|---|---|---|---|"]
    lines += [f"| {b} | {d} | {k} | {e:.2e} |" for (b, d, k), e in sorted(worst.items())]
    if bad:
        lines += ["", "Failed: " + "; ".join(f"int{r['bits']} g{r['group']} {r['shape']} {r['dtype']} M={r['rows']} "
                                             f"({r['rel_err']:.1e})" for r in bad[:20])]
    cols = ["dense_ms", "int8_ms", "int4_ms", "torchao_int8_ms", "torchao_int4_ms"]
    lines += ["", "## (b) Packed matmul time (ms, median) and speed-up over dense", "",
              "| case | M | dense | lensbench int8 | lensbench int4 | torchao int8 | torchao int4 | int4 x dense "
              "| int4 / torchao int4 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in spd:
        cells = [f"{r[c]:.4f}" if c in r else "-" for c in cols]
        ratio = f"{r['dense_ms'] / r['int4_ms']:.2f}"
        vs_ao = f"{r['int4_ms'] / r['torchao_int4_ms']:.2f}" if "torchao_int4_ms" in r else "-"
        lines.append(f"| {r['case']} | {r['M']} | {' | '.join(cells)} | {ratio} | {vs_ao} |")
    if notes:
        lines += ["", "torchao refused: " + "; ".join(notes)]
    lines += ["", "## (c) Whole-model decode, SmolLM2-135M, batch 1", "", "| method | tokens/s |", "|---|---|"]
    lines += [f"| {r['method']} | {r['tokens_per_s']:.1f} |" for r in dec]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: imports, cases, template")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "reports" / "GPU.md")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    name = "dry run on the CPU (tiny shapes, reference path)" if args.dry_run else torch.cuda.get_device_name()
    t0 = time.time()
    acc = correctness(device, args.dry_run)
    print(f"(a) {sum(r['ok'] for r in acc)}/{len(acc)} within tolerance", flush=True)
    spd, notes = speed(device, 3 if args.dry_run else args.reps, args.dry_run)
    print(f"(b) {len(spd)} timings", flush=True)
    dec = decode(device, args.decode, args.dry_run)
    print("(c) " + ", ".join(f"{r['method']} {r['tokens_per_s']:.1f} tokens/s" for r in dec), flush=True)
    text = report(name, acc, spd, notes, dec, time.time() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"(d) wrote {args.out}")
    return 0 if all(r["ok"] for r in acc) else 1


if __name__ == "__main__":
    sys.exit(main())
