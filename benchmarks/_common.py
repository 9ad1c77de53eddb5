"""Shared benchmark plumbing: interleaved timing, RSS sampling, and the record in reports/BENCHMARKS.md."""
from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import threading
import time
from importlib import metadata
from pathlib import Path

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


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, torch threads {torch.get_num_threads()}")


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
