"""Saved compressed models of SmolLM2-135M, measured where users run them: file bytes, held-out KL to the
dense model and perplexity as loaded by transformers and by llama.cpp, load time, and llama.cpp prefill /
decode tokens per second, against the source file and llama.cpp's own uniform quantisation of the dense
model at about the same size (`llama_model_quantize`).

Plans (from a redundancy + weight-outlier profile, made here in ~1 min):
  drop      drop-block, 3 blocks by redundancy
  uniform4  every block linear at 4 bits, --scheme gguf (Q4_K where rows allow, else Q4_0)
  uniform5  every block linear at 5 bits (Q5_K / Q5_0): about the size of llama.cpp's Q4_K_M, whose
            576-wide rows fall back to 5-bit types
  mixed     bits-rank --scheme gguf, levels 8,4 at 5.0 real bits per weight (ranking lim)
  combined  drop + mixed

The dense reference is lensbench's float32 model (SmolLM2's Q4_1 file dequantised); held-out BBC text
never seen by the profile. Writes reports/COMPRESS.md and appends to reports/BENCHMARKS.md.

Usage: python benchmarks/compress.py [--texts 16] [--seq-len 128] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, llama_batches, llama_logits, machine, perplexity, quality, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench import bundled  # noqa: E402
from lensbench.compress.save import compress  # noqa: E402
from lensbench.compress.plan import Plan  # noqa: E402
from lensbench.compress.policies import make_plan  # noqa: E402
from lensbench.profiling import profile_model  # noqa: E402
from lensbench.texts import bbc_news, select_texts  # noqa: E402

warnings.filterwarnings("ignore")
REPORT = Path(__file__).resolve().parent.parent / "reports" / "COMPRESS.md"


def hf_logits(module, ids) -> list[np.ndarray]:
    with torch.no_grad():
        return [module(torch.from_numpy(t)[None]).logits[0].float().numpy() for t in ids]


def llama_speed(llm, prompt: list[int], decode: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy run."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(decode):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), decode / (t2 - t1)


def llama_quantize(src: Path, dst: Path, ftype_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed with {rc}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from llama_cpp import Llama

    work = Path(tempfile.mkdtemp(prefix="lensbench-compress-"))
    model = lensbench.load("smollm2-135m")
    source, _ = bundled.resolve("smollm2-135m")
    profile = profile_model(model, select_texts(model, bbc_news("calibration"), 128, 2048),
                            analyses=["redundancy", "weight_outliers"], seq_len=128)
    drop = make_plan("drop-block", profile, 3, ranking="redundancy")
    mixed = make_plan("bits-rank", profile, 5.0, levels="8,4", ranking="lim", scheme="gguf")
    uniform = make_plan("bits-rank", profile, 4.5, levels="8,4", ranking="lim", scheme="gguf")  # all at 4 bits
    combined = Plan({**mixed.actions, **drop.actions}, drop.model, {"name": "drop-block + bits-rank"})
    uniform5 = make_plan("bits-rank", profile, 5.5, levels="8,5", ranking="lim", scheme="gguf")  # all at 5 bits
    plans = {"drop": drop, "uniform4": uniform, "uniform5": uniform5, "mixed": mixed, "combined": combined}

    held = select_texts(model, bbc_news("heldout"), args.seq_len, args.texts * args.seq_len)[: args.texts]
    ids = [model.tokenize([t], max_length=args.seq_len).input_ids[0].numpy() for t in held]
    dense = hf_logits(model.module, ids)

    files: dict[str, Path] = {"source Q4_1 (bundled file)": source}
    rows: dict[str, dict] = {}
    for name, plan in plans.items():
        t0 = time.perf_counter()
        saved = compress(model, plan, format="gguf", out=work / name)
        rows[f"lensbench {name}"] = {"write_s": time.perf_counter() - t0, "bpw": saved.record["bits_per_weight"],
                                     "types": saved.record["tensor_types"]}
        files[f"lensbench {name}"] = saved.path / saved.record["file"]
    f16 = compress(model, Plan({}, drop.model), format="gguf", out=work / "f16", dtype="float16")
    f16_file = f16.path / f16.record["file"]
    mixed_mb = files["lensbench mixed"].stat().st_size / 1e6
    for ftype in ("Q4_K_M", "Q5_K_M"):  # llama.cpp's own mixes on either side of the mixed plan's size
        dst = work / f"llama-{ftype}.gguf"
        t0 = time.perf_counter()
        llama_quantize(f16_file, dst, ftype)
        files[f"llama.cpp {ftype} (from F16)"] = dst
        rows[f"llama.cpp {ftype} (from F16)"] = {"write_s": time.perf_counter() - t0}

    from transformers import AutoModelForCausalLM

    prompt = ids[0].tolist()
    speeds: dict[str, list[tuple[float, float]]] = {k: [] for k in files}
    llms = {}
    batches, batch_note = llama_batches(next(iter(files.values())))
    for name, path in files.items():
        r = rows.setdefault(name, {})
        r["MB"] = path.stat().st_size / 1e6
        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        r["hf_load_s"] = time.perf_counter() - t0
        r["hf_kl"], r["hf_ppl"] = quality(dense, hf_logits(hf, ids), ids)
        del hf
        t0 = time.perf_counter()
        llms[name] = Llama(str(path), logits_all=True, verbose=False, n_ctx=args.seq_len + args.decode + 8,
                           n_threads=2, n_batch=args.seq_len, **batches)
        r["llama_load_s"] = time.perf_counter() - t0
        r["llama_kl"], r["llama_ppl"] = quality(dense, llama_logits(llms[name], ids), ids)
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):  # interleaved rounds, shuffled order
        for name in rng.permutation(list(files)):
            speeds[name].append(llama_speed(llms[name], prompt, args.decode))
    for llm in llms.values():
        llm.close()
    dense_ppl = perplexity(dense, ids)

    lines = [f"SmolLM2-135M, {len(ids)} held-out BBC texts × ≤{args.seq_len} tokens ({sum(map(len, ids))} tokens); "
             f"dense reference: lensbench's float32 model (perplexity {dense_ppl:.2f}). llama.cpp: prompt of "
             f"{len(prompt)} tokens, {args.decode} greedy decode steps, {args.rounds} interleaved rounds "
             f"(median / best), 2 threads. Mixed plan: {mixed_mb:.1f} MB file.", "",
             "| file | MB | bits/weight (2-D) | transformers KL | transformers ppl | llama.cpp KL | llama.cpp ppl | "
             "prefill tok/s | decode tok/s | load s (transformers / llama.cpp) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        pre = [s[0] for s in speeds[name]]
        dec = [s[1] for s in speeds[name]]
        bpw = f"{r['bpw']:.2f}" if "bpw" in r else "—"
        lines.append(f"| {name} | {r['MB']:.1f} | {bpw} | {r['hf_kl']:.4f} | {r['hf_ppl']:.2f} | {r['llama_kl']:.4f} | "
                     f"{r['llama_ppl']:.2f} | {statistics.median(pre):.0f} / {max(pre):.0f} | "
                     f"{statistics.median(dec):.1f} / {max(dec):.1f} | "
                     f"{r['hf_load_s']:.1f} / {r['llama_load_s']:.2f} |")
    lines += ["", "Tensor types of the lensbench files: " + "; ".join(
        f"{k.removeprefix('lensbench ')}: " + ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items()))
        for k, r in rows.items() if "types" in r)]
    lines += ["", batch_note] if batch_note else []
    pkgs = versions("lensbench", "torch", "transformers", "gguf", "llama-cpp-python")
    lines += ["", f"Machine: {machine()}. Versions: {pkgs}."]
    body = "\n".join(lines)
    print(body)
    REPORT.write_text("# Saved compressed models (benchmarks/compress.py)\n\n" + body + "\n")
    append_report("compress: saved GGUF files in transformers and llama.cpp", body)


if __name__ == "__main__":
    main()
