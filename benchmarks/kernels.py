"""Packed int8/int4 CPU kernels vs float32 torch.matmul on SmolLM2-135M's real linear weights, same run.

For each linear shape of SmolLM2 (q, k, v, o, gate, up, down) one call is a sweep over that
linear in all 30 layers (as a decode step touches each layer's weights once, so caches do not
flatter either side); "all 210" sweeps every block linear in layer order (one decode step's
linears). Decode = 1 activation row, prefill = 8 x 128 rows. Methods run in interleaved rounds;
speed = float32 time / packed time, the median over rounds of the per-round ratio, plus the
ratio of the medians and of the minima. Goal (issue 4): int8 decode >= 1.0x float32.

Also: every kernel's output against the dequantise-then-matmul reference on every shape and
bit-width (tolerance stated below), and the peak memory of each method in a fresh process
(weights as the method stores them, one decode and one prefill sweep).

Usage: python benchmarks/kernels.py [--rounds 15] [--prefill-rounds 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, append_report, interleaved, machine, versions  # noqa: E402

from lensbench.gpu import cpu_kernels, quant, reference  # noqa: E402

warnings.filterwarnings("ignore")
NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
GROUP = 128
TOL = 1e-5  # max |kernel - reference| / max |reference|, float32 accumulation in both


def weights_by_name() -> dict[str, list[torch.Tensor]]:
    import lensbench

    model = lensbench.load("smollm2-135m")
    blocks = model.adapter.blocks
    return {n: [b.get_submodule(n).weight.detach().float().contiguous().clone() for b in blocks] for n in NAMES}


def speed(ws: dict[str, list[torch.Tensor]], rows: int, rounds: int) -> list[dict]:
    packed = {b: {n: [quant.quantize(w, b, GROUP) for w in v] for n, v in ws.items()} for b in (8, 4)}
    out = []
    groups = [(n.split(".")[-1], [n]) for n in NAMES] + [("all 210", list(NAMES))]
    for label, names in groups:
        k = ws[names[0]][0].shape[1]
        xs = {n: torch.randn(rows, ws[n][0].shape[1]) for n in names}
        order = [(n, i) for i in range(len(ws[names[0]])) for n in names]

        methods = {"fp32": _sweep(order, xs, ws, torch.matmul, transpose=True),
                   "int8": _sweep(order, xs, packed[8], cpu_kernels.matmul),
                   "int4": _sweep(order, xs, packed[4], cpu_kernels.matmul)}
        for m in methods.values():  # warm-up (and numba compilation)
            m()
        t = interleaved(methods, rounds)
        shape = (f"{ws[names[0]][0].shape[0]}x{k}" if len(names) == 1 else "all")
        for bits in (8, 4):
            key = f"int{bits}"
            out.append({"linear": label, "shape": shape, "rows": rows, "method": key,
                        "fp32_ms": statistics.median(t["fp32"]) * 1e3, "packed_ms": statistics.median(t[key]) * 1e3,
                        "speed_paired": statistics.median(a / b for a, b in zip(t["fp32"], t[key], strict=True)),
                        "speed_median": statistics.median(t["fp32"]) / statistics.median(t[key]),
                        "speed_min": min(t["fp32"]) / min(t[key])})
    return out


def _sweep(order, xs, weights, fn, transpose=False):
    def run():
        for n, i in order:
            fn(xs[n], weights[n][i].T if transpose else weights[n][i])
    return run


@cpu_kernels.exact_kernels()
def accuracy(ws: dict[str, list[torch.Tensor]]) -> list[dict]:
    """Every kernel against the reference on the exact float32 path (`set_exact`): the default bfloat16 decode
    kernels and prefill tiles round activations to bfloat16 and are tested within 1e-2 of max |y| instead."""
    out = []
    shapes = {n: ws[n][0] for n in NAMES} | {"odd 100x200 (tail group)": torch.randn(100, 200) * 0.05}
    for label, w in shapes.items():
        for bits in quant.BITS:
            pw = quant.quantize(w, bits, GROUP)
            for rows in (1, 1024):
                x = torch.randn(rows, w.shape[1])
                ref = reference.matmul(x, pw)
                err = float((cpu_kernels.matmul(x, pw) - ref).abs().max() / ref.abs().max())
                out.append({"linear": label, "bits": bits, "rows": rows, "rel_err": err})
    return out


def memory_child(method: str) -> None:
    """Fresh process: weights of all 210 block linears stored as `method`, then one decode and one
    prefill sweep; prints the peak RSS rise for each stage."""
    torch.set_num_threads(2)
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
              "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}
    cpu_kernels.matmul(torch.randn(1, 64), quant.quantize(torch.randn(8, 64), 8, 32))  # compile outside the meter
    cpu_kernels.matmul(torch.randn(1, 64), quant.quantize(torch.randn(8, 64), 4, 32))
    cpu_kernels.matmul(torch.randn(16, 64), quant.quantize(torch.randn(8, 64), 8, 32))
    cpu_kernels.matmul(torch.randn(16, 64), quant.quantize(torch.randn(8, 64), 4, 32))
    with PeakRSS() as all_:
        weights = []
        for _ in range(30):
            for o, i in shapes.values():
                w = torch.randn(o, i) * 0.02
                weights.append((i, w if method == "fp32" else quant.quantize(w, int(method[3:]), GROUP)))
                del w
        with PeakRSS() as run:
            for rows in (1, 1024):
                for i, w in weights:
                    x = torch.randn(rows, i)
                    if method == "fp32":
                        torch.matmul(x, w.T)
                    else:
                        cpu_kernels.matmul(x, w)
    stored = sum(w.nbytes if method != "fp32" else w.numel() * 4 for _, w in weights)
    print(json.dumps({"method": method, "weight_bytes": stored, "peak_rise_total": all_.peak_delta,
                      "peak_rise_compute": run.peak_delta}))


def memory() -> list[dict]:
    out = []
    for method in ("fp32", "int8", "int4"):
        res = subprocess.run([sys.executable, __file__, "--memory-child", method], capture_output=True, text=True,
                             check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prefill-rounds", type=int, default=5)
    ap.add_argument("--memory-child")
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    torch.set_num_threads(2)
    cpu_kernels.set_threads(2)
    ws = weights_by_name()
    acc = accuracy(ws)
    worst = max(acc, key=lambda r: r["rel_err"])
    print(f"accuracy: worst relative error {worst['rel_err']:.2e} ({worst}); tolerance {TOL:g}", flush=True)
    rows = speed(ws, 1, args.rounds) + speed(ws, 1024, args.prefill_rounds)
    for r in rows:
        print(f"{r['linear']:>8} {r['shape']:>9} rows {r['rows']:>4} {r['method']}: fp32 {r['fp32_ms']:.3f} ms, "
              f"packed {r['packed_ms']:.3f} ms, x{r['speed_paired']:.2f} (paired)", flush=True)
    mem = memory()
    for m in mem:
        print(m, flush=True)
    write(rows, acc, mem, worst, args)


def write(rows, acc, mem, worst, args):
    lines = [f"SmolLM2-135M's real block linears (30 layers per shape), group size {GROUP}; {machine()}; numba "
             f"threads {cpu_kernels.numba.get_num_threads()}. Decode: 1 row, {args.rounds} interleaved rounds; "
             f"prefill: 1024 rows (8 x 128), {args.prefill_rounds} rounds. Speed = fp32 time / packed time "
             f"(>1 = packed faster). Versions: {versions('lensbench', 'torch', 'numba', 'numpy')}.", "",
             "| linear | W shape | rows | kernel | fp32 ms | packed ms | speed (paired median) | speed (medians) | "
             "speed (minima) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['linear']} | {r['shape']} | {r['rows']} | {r['method']} | {r['fp32_ms']:.3f} | "
                     f"{r['packed_ms']:.3f} | {r['speed_paired']:.2f} | {r['speed_median']:.2f} | "
                     f"{r['speed_min']:.2f} |")
    dec = next(r for r in rows if r["linear"] == "all 210" and r["rows"] == 1 and r["method"] == "int8")
    lines += ["", f"Goal int8 decode >= 1.0x fp32 over one decode step's 210 linears: x{dec['speed_paired']:.2f} "
              f"(paired), x{dec['speed_median']:.2f} (medians), x{dec['speed_min']:.2f} (minima) — "
              f"{'met' if dec['speed_paired'] >= 1.0 else 'NOT met'}.", "",
              f"Accuracy: {len(acc)} checks (7 real shapes + a 100x200 shape with a short last group; bits 2/3/4/8; "
              f"1 and 1024 rows): worst max|kernel - reference| / max|reference| = {worst['rel_err']:.2e} "
              f"(int{worst['bits']}, {worst['linear']}, {worst['rows']} rows); tolerance {TOL:g} — "
              f"{'all within' if worst['rel_err'] <= TOL else 'EXCEEDED'}.", "",
              "Memory (fresh process per method; 210 random weights of the same shapes; RSS sampled every 2 ms):", "",
              "| method | weight bytes | x fp32 | peak RSS rise, total | peak RSS rise while computing |",
              "|---|---|---|---|---|"]
    base = mem[0]["weight_bytes"]
    for m in mem:
        lines.append(f"| {m['method']} | {m['weight_bytes'] / 2**20:.1f} MiB | {m['weight_bytes'] / base:.3f} | "
                     f"{m['peak_rise_total'] / 2**20:.1f} MiB | {m['peak_rise_compute'] / 2**20:.1f} MiB |")
    body = "\n".join(lines)
    print(body)
    append_report("Packed int8/int4 CPU kernels vs float32 matmul (benchmarks/kernels.py)", body)


if __name__ == "__main__":
    main()
