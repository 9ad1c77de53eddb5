"""Resident memory of a packed SmolLM2-135M against its packed bytes: after loading, inside `apply` (the dense
model kept for restoring), after `convert` (in place, the dense weights released) with torch's decode kernels
and `lean` (no second copy of the codes), with the weight file memory-mapped (the default) and read into memory
(`lb.load(..., mmap=False)`: a mapping stays resident after its weights are released), each after a forward and
16 greedy decode steps.

Each case runs in a fresh process (RSS is per process), reading /proc/self/status: VmRSS now and VmHWM (peak).
"model bytes" are the bytes the model's parameters and buffers hold (`surgery.weight_bytes`: the packed codes,
scales and mins, the norms, and any float weight the plan leaves); the baseline is the same process after
importing torch, transformers and lensbench and compiling the packed kernels, before the model loads. The dense
model's own non-weight memory after the same forward and decode (tokenizer, module objects, activations, KV cache)
is measured in the dense case and subtracted in the last column, which compares the rest with the packed bytes. The plan
packs every block linear, the embedding and the tied LM head at int4 group 128 (round to nearest).

Two more cases load a compressed-tensors checkpoint of the model (every block linear on the symmetric int4 grid;
the format leaves the embedding and the tied head float32) that this run writes first: once with
`lb.load(folder, packed=True)` (the codes read straight into packed modules, `lensbench.packed_load`) and once
through transformers, which decompresses every weight into a dense model.

Three more load the bundled GGUF file itself (Q4_1 group 32, the embedding and tied head Q8_0): packed
(`lb.load("smollm2-135m", packed=True)`, `lensbench.gguf_packed`: the file's own codes, every weight checked
against the dequantised copy first), packed and lean, and in llama.cpp (llama-cpp-python, if installed:
`./run llama`), which memory-maps the file; its "model bytes" are the file's size.

Usage: python benchmarks/memory.py [--bits 4] [--group-size 128]
Appends to reports/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LLAMA_ONE_TOKEN_BATCHES, append_report, machine, versions  # noqa: E402

CASES = ("dense", "apply", "convert", "convert-lean", "convert, loaded with mmap=False",
         "convert-lean, loaded with mmap=False", "compressed-tensors folder, loaded packed",
         "compressed-tensors folder, loaded packed, lean", "compressed-tensors folder, loaded by transformers",
         "GGUF file, loaded packed", "GGUF file, loaded packed, lean", "GGUF file, loaded by llama.cpp")
SAVED = "compressed-tensors folder"  # the cases that load the checkpoint `save` writes, not the bundled model
GGUF = "GGUF file"  # the cases that load the bundled GGUF file as it is


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def warm_up(bits: int, group_size: int) -> None:
    """Compile the packed kernels (numba's JIT code stays resident, per bit width) before the baseline is
    read, so what is attributed to the model is the model's: those of the plan's width and of 8 bits, the GGUF
    file's embedding and head (Q8_0)."""
    import torch

    from lensbench.gpu import cpu_kernels
    from lensbench.gpu.quant import quantize

    for width in sorted({bits, 8}):
        pw = quantize(torch.randn(64, 2 * group_size), width, group_size)
        for rows in (1, 16, 64):
            cpu_kernels.matmul(torch.randn(rows, 2 * group_size), pw)
        cpu_kernels.gemv(torch.randn(1, 2 * group_size), pw)  # numba's kernel, which lean models and fusion call
        cpu_kernels.dequantize_rows(pw, torch.arange(4))


def save(folder: Path, bits: int, group_size: int) -> int:
    """The checkpoint the saved-folder cases load: every block linear at the symmetric grid (what
    compressed-tensors holds; the embedding and the tied head stay float32, the format packs linears only), in
    the largest group size up to `group_size` that divides every linear's inputs (the format has no shorter last
    group). Returns that group size."""
    import lensbench as lb
    from lensbench.profiling import model_card

    model = lb.load("smollm2-135m")
    cfg = model.module.config
    while cfg.hidden_size % group_size or cfg.intermediate_size % group_size:
        group_size //= 2
    specs = {f"model.layers.{i}": (bits, group_size, "sym") for i in range(model.n_layers)}
    lb.compress(model, lb.Plan.quantize(model_card(model), specs), format="compressed-tensors", out=folder)
    return group_size


def worker(case: str, bits: int, group_size: int, folder: str) -> dict:

    import ctypes

    import torch

    import lensbench as lb
    from lensbench.compress.apply import convert
    from lensbench.gpu.modules import make_lean
    from lensbench.profiling import model_card
    from lensbench.surgery import weight_bytes

    torch.set_num_threads(2)
    warm_up(bits, group_size)
    if case.endswith("llama.cpp"):
        return llama_worker(case)
    base = _status()
    if case.startswith((SAVED, GGUF)):
        model = lb.load(folder if case.startswith(SAVED) else "smollm2-135m", packed="packed" in case)
        if case.endswith("lean"):
            make_lean(model.module)
    else:
        model = lb.load("smollm2-135m", mmap="mmap=False" not in case)
    loaded = _status()
    specs = {f"model.layers.{i}": (bits, group_size) for i in range(model.n_layers)}
    plan = lb.Plan.quantize(model_card(model), specs | {"model.embed_tokens": (bits, group_size),
                                                        "lm_head": (bits, group_size)})
    ids = model.tokenize(["The history of the city begins with a small settlement by the river, where"]).input_ids

    def run() -> None:
        with torch.no_grad():
            model.module(ids)
            model.module.generate(ids, max_new_tokens=16, do_sample=False)

    def measure() -> dict:
        run()
        out = {"model_bytes": weight_bytes(model.module), "after": _status()}
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what is left is live, not memory the allocator keeps for reuse
        return out | {"trimmed": _status()}

    row = {"case": case, "base": base, "loaded": loaded}
    if case == "dense" or case.startswith((SAVED, GGUF)):
        return row | measure()
    if case == "apply":
        with lb.apply(model, plan):
            return row | measure()
    convert(model, plan, lean=case.startswith("convert-lean"))
    return row | {"converted": _status()} | measure()


def llama_worker(case: str) -> dict:
    """The bundled GGUF file in llama.cpp: the same prompt, a forward and 16 greedy tokens; the baseline is this
    process before the model loads (torch and lensbench imported, as in the other cases). The prompt goes in a
    token at a time (`LLAMA_ONE_TOKEN_BATCHES`), which changes llama.cpp's compute buffer, not the weights'
    memory."""
    import ctypes

    from lensbench.bundled import resolve

    try:
        from llama_cpp import Llama  # optional: llama-cpp-python (./run llama)
    except ImportError:
        return {"case": case, "skipped": "llama-cpp-python is not installed (./run llama builds it)"}
    path = resolve("smollm2-135m")[0]
    base = _status()
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=1, verbose=False, **LLAMA_ONE_TOKEN_BATCHES)
    loaded = _status()
    llm("The history of the city begins with a small settlement by the river, where", max_tokens=16, temperature=0.0)
    after = _status()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {"case": case, "base": base, "loaded": loaded, "model_bytes": path.stat().st_size, "after": after,
            "trimmed": _status()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.bits, args.group_size, args.folder)))
        return
    rows, skipped = [], []
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name) / "ck"
    saved_group = save(folder, args.bits, args.group_size)
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--worker", case, "--bits", str(args.bits), "--group-size",
                              str(args.group_size), "--folder", str(folder)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{case} failed: {out.stderr.strip().splitlines()[-1]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if "skipped" in r:
            print(f"{case}: left out ({r['skipped']})", flush=True)
            skipped.append(f"{case}: {r['skipped']}")
            continue
        rows.append(r)
        print(f"{case}: RSS over baseline {(r['after']['VmRSS'] - r['base']['VmRSS']) / 2**20:.0f} MiB, model bytes "
              f"{r['model_bytes'] / 2**20:.0f} MiB", flush=True)
    mib = 2 ** 20
    lines = [f"SmolLM2-135M, int{args.bits} group {args.group_size} on every block linear, the embedding and the tied "
             f"head; each case in a fresh process, after a forward and 16 decode steps. RSS over the baseline (the "
             f"process with torch, transformers and lensbench imported and the kernels compiled, before loading). "
             f"{machine()}; "
             f"{versions('torch', 'transformers')}.", "",
             "| case | model bytes (MiB) | RSS over baseline (MiB) | RSS / model bytes | after malloc_trim (MiB) | "
             "right after convert (MiB) | peak over baseline (MiB) | after trim, less the dense overhead / model "
             "bytes |", "|---|---|---|---|---|---|---|---|"]
    dense = next(r for r in rows if r["case"] == "dense")
    overhead = dense["trimmed"]["VmRSS"] - dense["base"]["VmRSS"] - dense["model_bytes"]
    for r in rows:
        rss = r["after"]["VmRSS"] - r["base"]["VmRSS"]
        conv = f"{(r['converted']['VmRSS'] - r['base']['VmRSS']) / mib:.1f}" if "converted" in r else "—"
        trim = (r["trimmed"]["VmRSS"] - r["base"]["VmRSS"]) / mib
        lines.append(f"| {r['case']} | {r['model_bytes'] / mib:.1f} | {rss / mib:.1f} | {rss / r['model_bytes']:.2f} | "
                     f"{trim:.1f} | {conv} | {(r['after']['VmHWM'] - r['base']['VmRSS']) / mib:.1f} | "
                     f"{(trim * mib - overhead) / r['model_bytes']:.2f} |")
    lines += ["", f"The dense overhead: what the dense model's process holds after the same forward, decode and trim "
              f"beyond its weight bytes ({overhead / mib:.1f} MiB: the tokenizer, the module objects, activations and "
              f"the KV cache), subtracted in the last column, which then compares what a packed model holds with its "
              f"packed bytes.", "",
              f"The compressed-tensors folder: every block linear at int{args.bits} group {saved_group} on the "
              f"symmetric grid (the largest group up to {args.group_size} that divides every linear's inputs), the "
              f"embedding and the tied head float32; loaded packed (`lb.load(folder, packed=True)`) and by "
              f"transformers (which decompresses it into float weights); `lean`: off torch's weight-only "
              f"kernels, as in convert-lean.", "",
              "The GGUF file: the bundled SmolLM2 as it is (Q4_1 group 32, the embedding and tied head Q8_0), loaded "
              "packed (`lb.load(\"smollm2-135m\", packed=True)`) and in llama.cpp, which maps the file (its model "
              "bytes: the file's size)."]
    lines += [f"Left out: {s}." for s in skipped]
    body = "\n".join(lines) + "\n"
    print(body)
    append_report("Resident memory of packed models (benchmarks/memory.py)", body)


if __name__ == "__main__":
    main()
