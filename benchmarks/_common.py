"""Shared benchmark plumbing: interleaved timing, a competing process, RSS sampling, quality from logits (and
llama.cpp's), and the record in reports/BENCHMARKS.md."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil

REPORT = Path(__file__).resolve().parent.parent / "reports" / "BENCHMARKS.md"


class PeakRSS:
    """Samples this process's RSS every `interval` seconds; `.peak_delta` is the rise above the start."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.proc = psutil.Process()

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_delta = self.peak - self.start


def interleaved(methods: dict, rounds: int, seed: int = 0, self_timed: bool = False,
                pause: float = 0.0) -> dict[str, list[float]]:
    """Run every method once per round in a shuffled order; seconds per call for each method (with
    `self_timed`, the seconds each call returns: the part it times itself). `pause` seconds of sleep before
    each call let the previous method's spinning threads go idle."""
    rng = random.Random(seed)
    times = {k: [] for k in methods}
    for _ in range(rounds):
        order = list(methods)
        rng.shuffle(order)
        for name in order:
            time.sleep(pause)
            t0 = time.perf_counter()
            got = methods[name]()
            times[name].append(got if self_timed else time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def competing_process():
    """One CPU-bound process (`while True: pass`) running through the block, started a second before it."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        yield
    finally:
        hog.kill()
        hog.wait()


def ratio_rows(times: dict, baseline: str) -> list[tuple[str, float, float, float, float, float]]:
    """(name, median s, min s, median ratio, min ratio, paired ratio) against `baseline`.

    The paired ratio is the median over rounds of (method / baseline in the same round): slow drifts
    of the machine cancel within a round, so it is the steadiest of the three on a noisy machine.
    """
    b = times[baseline]
    b_med, b_min = statistics.median(b), min(b)
    return [(k, statistics.median(v), min(v), statistics.median(v) / b_med, min(v) / b_min,
             statistics.median(x / y for x, y in zip(v, b, strict=True))) for k, v in times.items()]


def versions(*packages: str) -> str:
    out = []
    for p in packages:
        try:
            out.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            out.append(f"{p} (not installed)")
    return ", ".join(out)


def cpu_model() -> str:
    """The CPU's name as the kernel reports it, and the vector extensions the kernels' speed turns on (runs on
    different hosts of one cloud are not comparable: the CPU is named so they can be told apart)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    name, flags = fields.get("model name", ""), set(fields.get("flags", "").split())
    ext = [e for e, f in (("AVX512-VNNI", "avx512_vnni"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_tile"))
           if f in flags]
    return f"{name or 'unknown CPU'} ({', '.join(ext) or 'no AVX-512 VNNI, BF16 or AMX'})"


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
            f"torch threads {torch.get_num_threads()}")


def append_report(title: str, body: str) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = "" if REPORT.exists() else "# Benchmark record\n\nAppended by `benchmarks/*.py`; newest last.\n"
    with open(REPORT, "a") as fh:
        fh.write(f"{header}\n## {title} — {stamp}\n\n{body.rstrip()}\n")


def ratio_table(rows, versus: str) -> list[str]:
    """Markdown lines for `ratio_rows` output, ratios labelled `x <versus>`."""
    lines = [f"| method | median s | min s | x {versus} (median) | x {versus} (min) | x {versus} (paired) |",
             "|---|---|---|---|---|---|"]
    for name, med, mn, rmed, rmin, rpair in rows:
        lines.append(f"| {name} | {med:.2f} | {mn:.2f} | {rmed:.3f} | {rmin:.3f} | {rpair:.3f} |")
    return lines


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x, -1, keepdims=True)


def perplexity(logits: list[np.ndarray], ids: list[np.ndarray]) -> float:
    """Perplexity of next-token predictions: logits [T, V] per text against its token ids [T]."""
    nll, n = 0.0, 0
    for g, t in zip(logits, ids, strict=True):
        lg = log_softmax(g.astype(np.float64))
        nll -= lg[np.arange(len(t) - 1), t[1:]].sum()
        n += len(t) - 1
    return float(np.exp(nll / n))


def quality(dense: list[np.ndarray], got: list[np.ndarray], ids: list[np.ndarray]) -> tuple[float, float]:
    """(mean KL(dense || got) per token, perplexity of got) over the held-out texts."""
    kls = []
    for d, g in zip(dense, got, strict=True):
        ld, lg = log_softmax(d.astype(np.float64)), log_softmax(g.astype(np.float64))
        kls.append((np.exp(ld) * (ld - lg)).sum(-1))
    return float(np.concatenate(kls).mean()), perplexity(got, ids)


# llama.cpp's batched matmuls die of SIGILL on hosts that report AMX but whose hypervisor does not enable it
# (ggml-org/llama.cpp#28328; this machine). One token per micro-batch runs there and gives the same logits, so the
# benchmarks that read logits or time one-token decode steps (not a batched prompt) make their models with it.
LLAMA_ONE_TOKEN_BATCHES = {"n_ubatch": 1}

_PROBE = ("from llama_cpp import Llama\nllm = Llama({path!r}, verbose=False, n_ctx=64, n_threads=2)\n"
          "llm.eval(list(range(1, 17)))\nllm.close()\n")


def llama_batches(path) -> tuple[dict, str]:
    """The micro-batch keyword for `llama_cpp.Llama` on this host and what to say about it: {} when a batched
    prompt runs (tried in a child process on the GGUF file at `path`), else `LLAMA_ONE_TOKEN_BATCHES` and a note
    that llama.cpp's prompt speed was measured a token per micro-batch (and why)."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", _PROBE.format(path=str(path))], capture_output=True, timeout=300)
    if probe.returncode == 0:
        return {}, ""
    return LLAMA_ONE_TOKEN_BATCHES, (f"llama.cpp's batched prompt died on this host (exit {probe.returncode}; "
                                     f"ggml-org/llama.cpp#28328), so its prompts ran a token per micro-batch: its "
                                     f"prefill speed here is not its batched one")


def llama_logits(llm, ids) -> list[np.ndarray]:
    """llama.cpp's logits [T, V] for each token list (a `llama_cpp.Llama` made with logits_all=True)."""
    out = []
    for t in ids:
        llm.reset()
        llm.eval(list(map(int, t)))
        out.append(np.array(llm.scores[: len(t)], dtype=np.float32))
    return out
