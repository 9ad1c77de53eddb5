"""The compiled decode step's first call (compiling included) and its speed, with inductor's C++ wrapper built in one
compile with its kernels (torch's default: all at -O3) and apart from them (`Decoder(separate_build=True)`, the
default: the wrapper at -O1, the kernels at -O3).

First call: for SmolLM2-135M in float32 and converted to int4 g128 (every linear, the LM head and the embedding),
each build in a fresh process with an empty inductor cache (`TORCHINDUCTOR_CACHE_DIR`), the first
`Decoder.generate` of 8 tokens after a 128-token prompt timed as a user meets it: the default thread policy compiles
the step for 2 threads and for 1, so two graphs. The builds alternate (one file first for float32, apart first for
int4). Speed: both builds' Decoders in one process, steps on 2 threads, interleaved rounds of 32 decode steps.

Usage: python benchmarks/compile_time.py [--rounds 8]
Appends to reports/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, interleaved, machine, versions  # noqa: E402
from decode import compiled_seconds, whole_model_plan  # noqa: E402

import lensbench as lb  # noqa: E402
from lensbench.compress.apply import convert  # noqa: E402
from lensbench.decoding import Decoder  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

STEPS = 32
BUILDS = {"one file (torch's default)": False, "wrapper apart, -O1 (lensbench's default)": True}
KINDS = ("float32", "int4 g128")


def model_and_prompt(kind: str):
    model = lb.load("smollm2-135m")
    if kind != "float32":
        convert(model, whole_model_plan(model, 4, 128, "asym"))
    ids = model.tokenize([" ".join(bbc_news("heldout")[:4])], max_length=128).input_ids
    return model, ids


def first_call(kind: str, separate: bool) -> None:
    """In a fresh process: the seconds of the first generate, printed as JSON."""
    torch.set_num_threads(2)
    model, ids = model_and_prompt(kind)
    dec = Decoder(model, max_length=ids.shape[1] + STEPS + 1, separate_build=separate)
    t0 = time.perf_counter()
    dec.generate(ids, 8)
    print(json.dumps({"first_s": time.perf_counter() - t0}))


def cold(kind: str, separate: bool) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, __file__, "--child", kind, str(int(separate))], env=env,
                             capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["first_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        first_call(args.child[0], bool(int(args.child[1])))
        return
    t_start = time.perf_counter()
    firsts = {}
    for i, kind in enumerate(KINDS):
        for name in (list(BUILDS) if i % 2 == 0 else list(BUILDS)[::-1]):
            firsts[kind, name] = cold(kind, BUILDS[name])
            print(f"{kind}, {name}: first call {firsts[kind, name]:.1f} s", file=sys.stderr, flush=True)
    torch.set_num_threads(2)
    speed = {}
    for kind in KINDS:
        decs = {}
        for name, separate in BUILDS.items():
            model, ids = model_and_prompt(kind)
            decs[name] = Decoder(model, max_length=ids.shape[1] + STEPS + 1, threads=2, separate_build=separate)
            decs[name].generate(ids, 2)
        methods = {name: (lambda d=d, i=ids: compiled_seconds(d, i, STEPS) / STEPS) for name, d in decs.items()}
        speed[kind] = interleaved(methods, args.rounds, self_timed=True, pause=0.05)
    lines = [f"SmolLM2-135M, float32 and int4 g128 (every linear, the LM head and the embedding). First call: a fresh "
             f"process with an empty inductor cache, the first `Decoder.generate` of 8 tokens after a 128-token prompt "
             f"(the thread policy compiles the step for 2 threads and for 1); one run per build. Steps: both builds "
             f"in one process, 2 threads, {args.rounds} interleaved rounds of {STEPS} decode steps (ms per step, "
             f"median / min). {machine()}; {versions('torch', 'transformers')}; "
             f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}. "
             f"{(time.perf_counter() - t_start) / 60:.1f} min.", "",
             "| model | build | first call s | ms per step |", "|---|---|---|---|"]
    for kind in KINDS:
        for name in BUILDS:
            ts = [t * 1e3 for t in speed[kind][name]]
            lines.append(f"| {kind} | {name} | {firsts[kind, name]:.1f} | {statistics.median(ts):.2f} / "
                         f"{min(ts):.2f} |")
    body = "\n".join(lines) + "\n"
    print(body)
    append_report("Compiled decode step's first call and build (benchmarks/compile_time.py)", body)


if __name__ == "__main__":
    main()
