"""Capture overhead and memory on SmolLM2-135M, measured side by side in one run.

  overhead:  batch 8 x 128 tokens; plain HF forward vs output_hidden_states vs lensbench capture of
             all five sites in all 30 layers (hooks and nnsight backends) vs nnsight saving the 30
             block outputs vs TransformerLens 4 `run_with_cache` (full cache). Rounds are interleaved
             in shuffled order; median and min are reported, as ratios to the plain forward.
             Peak RSS rise of each method's first call is sampled every 2 ms, in a fresh process per
             method (in one process the allocator reuses freed pages and hides the rise).
             Captured bytes count shared storage once (resid_pre of block i+1 is resid_post of block i).
  streaming: capture_to_store of >= 200k tokens into an on-disk store; RSS after every chunk.

Usage: python benchmarks/capture.py [--part overhead|streaming|all] [--rounds 8] [--tokens 200000]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, interleaved, machine, ratio_rows, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

warnings.filterwarnings("ignore")
PACKAGES = ("lensbench", "torch", "transformers", "nnsight", "transformer-lens")


def full_length_batch(model, n=8, seq_len=128):
    texts = [t for t in bbc_news("calibration", limit=64) if len(model.tokenizer(t)["input_ids"]) >= seq_len][:n]
    batch = model.tokenize(texts, max_length=seq_len)
    assert tuple(batch.input_ids.shape) == (n, seq_len)
    return batch


HOOKS = "lensbench capture (hooks, 5 sites x 30 layers)"


def build_methods(model, batch) -> dict:
    """The contenders, each a zero-argument call on the same batch (all under torch.no_grad)."""
    import nnsight
    from nnsight import NNsight
    from transformer_lens.model_bridge import TransformerBridge

    hf = model.module
    inputs = batch.model_inputs()
    wrapped = NNsight(hf)
    bridge = TransformerBridge.boot_transformers(model.card["local_dir"], device="cpu")
    n = model.n_layers

    def nnsight_blocks():
        with wrapped.trace(**inputs):
            saved = nnsight.save([wrapped.model.layers[i].output for i in range(n)])
        return saved

    return {
        "plain HF forward": lambda: hf(**inputs),
        "HF output_hidden_states": lambda: hf(**inputs, output_hidden_states=True),
        HOOKS: lambda: lensbench.capture(model, batch),
        "lensbench capture (nnsight backend, same sites)": lambda: lensbench.capture(model, batch, backend="nnsight"),
        "nnsight, save 30 block outputs": nnsight_blocks,
        "TransformerLens 4 run_with_cache (full)": lambda: bridge.run_with_cache(batch.input_ids),
    }


def one_method_memory(name: str) -> None:
    """Child process: the peak RSS rise of the first call of one method, printed as JSON."""
    import gc
    import json

    from _common import PeakRSS

    model = lensbench.load("smollm2-135m")
    batch = full_length_batch(model)
    methods = build_methods(model, batch)
    gc.collect()
    with torch.no_grad(), PeakRSS() as rss:
        result = methods[name]()
    print(json.dumps({"peak_rise": rss.peak_delta}))
    del result


def memory(names) -> dict[str, float]:
    """Peak RSS rise per method, each measured in a fresh process (no allocator reuse between methods)."""
    import json
    import subprocess

    out = {}
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--one-memory", name], capture_output=True, text=True,
                              check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rise"]
    return out


def overhead(rounds: int) -> str:
    model = lensbench.load("smollm2-135m")
    batch = full_length_batch(model)
    methods = build_methods(model, batch)
    # correctness before speed: the captured block outputs equal HF's hidden states
    with torch.no_grad():
        trace = lensbench.capture(model, batch)
        hs = model.module(**batch.model_inputs(), output_hidden_states=True).hidden_states
        for i in range(model.n_layers - 1):
            torch.testing.assert_close(trace[f"blocks.{i}.hook_resid_post"], hs[i + 1])
        captured = trace.nbytes
        del trace, hs
        for fn in methods.values():  # warm-up
            fn()
        times = interleaved(methods, rounds)
    mem = memory(list(methods))
    rows = ratio_rows(times, "plain HF forward")
    lines = [f"SmolLM2-135M fp32, batch 8 x 128 tokens, {rounds} interleaved rounds. {machine()}.",
             f"Versions: {versions(*PACKAGES)}.", "",
             "| method | median s | min s | x plain (median) | x plain (min) | x plain (paired median) "
             "| peak RSS rise MiB (fresh process) |",
             "|---|---|---|---|---|---|---|"]
    for name, med, mn, rmed, rmin, rpair in rows:
        lines.append(f"| {name} | {med:.3f} | {mn:.3f} | {rmed:.3f} | {rmin:.3f} | {rpair:.3f} "
                     f"| {mem[name] / 2**20:.0f} |")
    budget = (mem["plain HF forward"] + captured) * 1.10
    lines += ["", f"Captured bytes (5 sites x 30 layers, fp32): {captured / 2**20:.0f} MiB. "
              f"Memory goal: peak rise <= (plain {mem['plain HF forward'] / 2**20:.0f} + captured "
              f"{captured / 2**20:.0f}) x 1.10 = {budget / 2**20:.0f} MiB; measured {mem[HOOKS] / 2**20:.0f} MiB "
              f"-> {'met' if mem[HOOKS] <= budget else 'NOT met'}.",
              "Speed goal (<= 1.05x plain, and below nnsight and TransformerLens): "
              + "; ".join(f"by {label} ratio {'met' if _speed_goal(rows, HOOKS, col) else 'NOT met'}"
                          for label, col in (("median", 3), ("min", 4), ("paired", 5))) + ".",
              "Noise on this machine is +-5-10% run to run: differences of a few percent are not significant."]
    return "\n".join(lines)


def _speed_goal(rows, hooks, column: int) -> bool:
    r = {row[0]: row[column] for row in rows}
    return r[hooks] <= 1.05 and r[hooks] < r["nnsight, save 30 block outputs"] and \
        r[hooks] < r["TransformerLens 4 run_with_cache (full)"]


def streaming(tokens: int) -> str:
    from lensbench.store import capture_to_store

    model = lensbench.load("smollm2-135m")
    seq_len = 256
    texts, total = [], 0
    for t in bbc_news("calibration"):
        texts.append(t)
        total += min(len(model.tokenizer(t)["input_ids"]), seq_len)
        if total >= tokens:
            break
    root = Path(tempfile.mkdtemp(prefix="lensbench-stream-"))
    proc = psutil.Process()
    curve = []
    done = [0]
    t0 = time.perf_counter()

    def record(index):
        done[0] += 1
        curve.append((index, proc.memory_info().rss))

    try:
        store = capture_to_store(model, texts, root / "store", sites=["hook_resid_post"], batch_size=8,
                                 seq_len=seq_len, dtype=torch.float16, progress=True, after_chunk=record)
        n_tokens = store.n_tokens
        disk = sum(f.stat().st_size for f in (root / "store").iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - t0
    rss = [r for _, r in curve]
    first = rss[min(4, len(rss) - 1)]
    step = max(1, len(curve) // 12)
    points = ", ".join(f"{i + 1}: {r / 2**20:.0f}" for i, r in curve[::step])
    return "\n".join([
        f"capture_to_store, SmolLM2-135M, hook_resid_post of all 30 layers, fp16, batch 8 x <= {seq_len} tokens. "
        f"{machine()}. Versions: {versions(*PACKAGES)}.", "",
        f"- {n_tokens} tokens in {len(curve)} chunks, {seconds:.0f} s ({n_tokens / seconds:.0f} tokens/s), "
        f"{disk / 2**30:.2f} GiB on disk",
        f"- RSS after chunk 5: {first / 2**20:.0f} MiB; max over the run: {max(rss) / 2**20:.0f} MiB; "
        f"last: {rss[-1] / 2**20:.0f} MiB (growth after chunk 5: {(max(rss) - first) / 2**20:+.0f} MiB)",
        f"- RSS curve (chunk: MiB): {points}",
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("overhead", "streaming", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--one-memory", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.one_memory:
        return one_method_memory(args.one_memory)
    if args.part in ("overhead", "all"):
        text = overhead(args.rounds)
        print(text)
        append_report("Capture overhead (benchmarks/capture.py)", text)
    if args.part in ("streaming", "all"):
        text = streaming(args.tokens)
        print(text)
        append_report("Streaming capture memory (benchmarks/capture.py)", text)


if __name__ == "__main__":
    main()
