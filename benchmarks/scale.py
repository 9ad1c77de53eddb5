"""Executors on this machine: the SmolLM2-135M ablation scan serially and on 2 local workers (processes, Ray),
their results compared, and the per-item overhead and object-store traffic of each executor.

    python benchmarks/scale.py [--rounds 3] [--max-tokens 512] [--batch-size 4]

1. The scan (`profile --analyses ablation`: every block, attention and MLP sublayer removed alone, KL and loss on
   BBC calibration text) as serial with torch's default threads (both cores), serial on one thread, and
   `--executor process|ray --workers 2` (one thread each), in interleaved rounds, each run in a process of its
   own as `lensbench profile` runs it; the time is `profile_model`'s, which includes starting the workers and
   landing the model in them (the process's imports and model load, and Ray's own start, are timed apart).
   (Before, every run shared one driver process and the Ray row came out x2 slower than serial, which a plain
   script did not reproduce; each run in its own process is also what a user's command does.)
   Every profile is compared with the serial one.
2. Per-item overhead: a sweep of 2000 items that do nothing: the time from the first result to the last per item
   (workers running), and the time to the first result (workers started, model landed).
3. Traffic: the bytes `ship` puts in the object store once, and the bytes per item sent and returned.

Writes reports/SCALE.md and appends to reports/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, interleaved, machine, ratio_rows, ratio_table, versions  # noqa: E402

import lensbench as lb  # noqa: E402
from lensbench.executor import ExecutorConfig, run_items, ship  # noqa: E402
from lensbench.texts import bbc_news, select_texts  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "reports" / "SCALE.md"


class Nothing:
    """Items that do nothing: what is left is the executor's own cost per item."""

    def setup(self, model) -> None:
        pass

    def run(self, item):
        return {"item": item}


SCAN = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import torch
    import lensbench as lb
    from lensbench.executor import ExecutorConfig, connect
    from lensbench.profiling import profile_model
    from lensbench.texts import bbc_news, select_texts

    if __name__ == "__main__":  # spawned process workers import this file again
        kind, threads, max_tokens, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        torch.set_num_threads(threads)
        model = lb.load("smollm2-135m")
        texts = select_texts(model, bbc_news("calibration"), 128, max_tokens)
        t0 = time.perf_counter()
        if kind == "ray":
            connect(ExecutorConfig("ray"))
        ray_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        profile = profile_model(model, texts, analyses=["ablation"], progress=False, batch_size=batch, seq_len=128,
                                executor=None if kind == "serial" else ExecutorConfig(kind, workers=2))
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "ray_start": ray_start,
                          "scores": {k: np.asarray(v.values).tolist() for k, v in profile.scores.items()}}))
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    model = lb.load("smollm2-135m")
    texts = select_texts(model, bbc_news("calibration"), 128, args.max_tokens)
    threads = torch.get_num_threads()
    profiles, ray_starts, seconds = {}, [], {}
    script = Path("/tmp") / f"lensbench-scale-{os.getpid()}.py"
    script.write_text(SCAN)

    def scan(name: str, kind: str, one_thread: bool = False):
        """One scan in a process of its own, as `lensbench profile` runs: the time of `profile_model` (worker
        start-up included; the process's imports and model load, and a Ray run's own start, are not)."""
        def run():
            out = subprocess.run([sys.executable, str(script), kind, str(1 if one_thread else threads),
                                  str(args.max_tokens), str(args.batch_size)], capture_output=True, text=True,
                                 check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            profiles[(kind, one_thread)] = result["scores"]
            ray_starts.extend([result["ray_start"]] if kind == "ray" else [])
            seconds.setdefault(name, []).append(result["seconds"])
        return run

    serial = f"serial ({threads} threads)"
    methods = {serial: scan(serial, "serial"), "serial (1 thread)": scan("serial (1 thread)", "serial", True),
               "process x2": scan("process x2", "process"), "ray x2": scan("ray x2", "ray")}
    load = os.getloadavg()[0]
    try:
        interleaved(methods, args.rounds)  # its own times include each process's start; the scans' are `seconds`
    finally:
        script.unlink(missing_ok=True)
    times = {name: seconds[name] for name in methods}
    ray_start = float(np.median(ray_starts))
    load = max(load, os.getloadavg()[0])
    rows = ratio_rows(times, f"serial ({threads} threads)")
    n_items = 3 * model.n_layers * -(-len(texts) // args.batch_size)

    base = profiles[("serial", False)]
    equal = {}
    for key, prof in profiles.items():
        worst = 0.0
        same = True
        for name, values in base.items():
            a, b = np.asarray(values), np.asarray(prof[name])
            same &= bool(np.array_equal(a, b))
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30))))
        equal[key] = (same, worst)

    overhead = {}
    for kind in ("serial", "process", "ray"):
        stamps: list[float] = []
        t0 = time.perf_counter()
        run_items(Nothing(), model, list(range(2000)), ExecutorConfig(kind, workers=None if kind == "serial" else 2),
                  on_done=lambda *_, stamps=stamps: stamps.append(time.perf_counter()))
        overhead[kind] = ((stamps[-1] - stamps[0]) / (len(stamps) - 1), stamps[0] - t0)
    shipped = ship(model)
    item_bytes = len(json.dumps([0, 0, 0])) + len(json.dumps({"kl": 0.123456789012345, "dloss": 0.123456789012345}))

    lines = [f"Machine: {machine()}; load average before/after the rounds up to {load:.1f} "
             f"({'busy' if load > 2.5 else 'quiet'} for 2 cores).",
             f"Versions: {versions('lensbench', 'torch', 'transformers', 'ray')}.", "",
             f"### The ablation scan of SmolLM2-135M ({len(texts)} BBC calibration texts x 128 tokens, batch "
             f"{args.batch_size}: {n_items} items), {args.rounds} interleaved rounds", "",
             *ratio_table(rows, "serial"), "",
             "x > 1 is slower than serial. Each run is a process of its own; its time includes starting 2 workers "
             f"and landing the model in them; Ray's own start (median {ray_start:.1f} s) is not in the rows.", "",
             "| run | profile equal to serial (bit for bit) | largest relative difference |", "|---|---|---|"]
    for (kind, one), (same, worst) in equal.items():
        lines.append(f"| {kind}{' (1 thread)' if one else ''} | {'yes' if same else 'no'} | {worst:.1e} |")
    lines += ["", "### Per-item overhead (2000 items that do nothing, 2 workers)", "",
              "| executor | per item once running, ms | start-up: first result after, s (workers started, model "
              "landed) |", "|---|---|---|"]
    for kind, (per, first) in overhead.items():
        lines.append(f"| {kind} | {per * 1e3:.3f} | {first:.2f} |")
    lines += ["", "### Traffic", "",
              f"- The model package (`ship`: weights, config, tokenizer) is {shipped.nbytes / 2**20:.0f} MiB, put in "
              f"the object store once per sweep and read by every worker on the node from there (one copy per "
              f"worker, made writable, since analyses edit weights in place).",
              f"- Per ablation item about {item_bytes} bytes cross (the item, and its two sums back); the dense run "
              f"of a batch is recomputed by each worker that gets one of its items (one forward per batch and "
              f"worker, against {3 * model.n_layers} suffix forwards per batch for the scan)."]
    body = "\n".join(lines)
    print(body)
    OUT.write_text("# Executors: serial, local processes and Ray on this machine\n\n"
                   "Written by `python benchmarks/scale.py`; see docs/SCALE.md for how a larger sweep is laid out.\n\n"
                   + body + "\n")
    append_report("Executors: the SmolLM2 ablation scan serial vs 2 workers (benchmarks/scale.py)", body)


if __name__ == "__main__":
    main()
