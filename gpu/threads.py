"""How many threads a packed decode step runs on, chosen by measuring the steps themselves.

On a shared CPU a kernel split over every core waits at its end for whichever of its threads the OS has
preempted, for a scheduler time slice each time: with one competing CPU-bound process on 2 cores, SmolLM2's
int8 decode fell from 39.7 to 7.1 tokens/s on 2 threads, and choosing the count per step (by the median, in
that run) kept 30.0 of 38.7 (benchmarks/decode.py; reports/BENCHMARKS.md and reports/DECODE.md). Which count is
faster depends on the load of the moment, so `Adaptive` times every decode step, keeps the recent times of
each candidate count (1, 2, 4, ... up to the configured threads), runs the fastest by `cost`, and tries
another every `explore` steps so it notices when load comes or goes.

`install(module)` puts it around a model's forward for decode-size calls (≤ `max_tokens` tokens); the
user's thread setting is restored after every step. The compiled decoder (`lensbench.decoding`) runs the same
policy around its compiled steps, which call no module hooks.
"""
from __future__ import annotations

import statistics
import time
from collections import deque

import torch

MAX_TOKENS = 12  # the decode-size calls the packed kernels run as matrix-vector products


def candidates(max_threads: int) -> list[int]:
    out, n = [], 1
    while n < max_threads:
        out.append(n)
        n *= 2
    return out + [max_threads]


def cost(times) -> float:
    """A count's recent step time: the mean without the slowest step. Throughput pays every step's time, and under
    load most steps on every core are quick while many wait a whole scheduler slice for a preempted thread, which
    a median would hide; one slow step alone (another process's threads still spinning after their work) is
    dropped, or it would hold the policy on the slower count until the window renews."""
    xs = sorted(times)
    return statistics.fmean(xs[:-1] if len(xs) >= 3 else xs)


class Adaptive:
    """Choose a thread count per step from the recent step times of each candidate.

    With `backoff` > 1 the steps between explorations double (up to `backoff` times `explore`) after each
    exploration that ran over twice the best count's cost, and return to `explore` after one that did not: where
    the losing count is much slower (GPTQ's solves on 2 threads beside a busy process: benchmarks/gptq_threads.py),
    exploring at a fixed rate would cost more than it could find. `first`: each count's steps before
    the first choice."""

    def __init__(self, max_threads: int, explore: int = 32, window: int = 8, backoff: int = 1, first: int = 2):
        self.options = candidates(max(1, max_threads))
        self.times = {n: deque(maxlen=window) for n in self.options}
        self.explore, self.backoff, self.first = explore, backoff, first
        self.interval = self.next = explore  # steps between explorations, and the step of the next one
        self.exploring: int | None = None
        self.steps = 0
        self.turn = 0

    def best(self) -> int:
        """The count with the lowest recent step time by `cost`."""
        return min(self.options, key=lambda n: cost(self.times[n]))

    def choose(self) -> int:
        self.steps += 1
        for n in self.options:  # every count measured `first` times before choosing
            if len(self.times[n]) < self.first:
                return n
        if len(self.options) > 1 and self.steps >= self.next:
            self.next = self.steps + self.interval
            others = [n for n in self.options if n != self.best()]
            self.turn += 1
            self.exploring = others[self.turn % len(others)]
            return self.exploring
        return self.best()

    def record(self, threads: int, seconds: float) -> None:
        if threads == self.exploring:
            self.exploring = None
            lost = seconds > 2 * cost(self.times[self.best()])
            self.interval = min(2 * self.interval, self.backoff * self.explore) if lost else self.explore
        self.times[threads].append(seconds)


def use(n: int) -> None:
    """Run torch's (and numba's) kernels on `n` threads."""
    torch.set_num_threads(n)
    try:
        from .cpu_kernels import set_threads  # optional: numba
    except ImportError:  # pragma: no cover
        return
    set_threads(n)


def install(module: torch.nn.Module, max_tokens: int = MAX_TOKENS) -> callable:
    """Adaptive threads around `module`'s decode-size forwards; returns the function that removes them."""
    policy = Adaptive(torch.get_num_threads())
    state: dict = {}

    def pre(mod, args, kwargs):
        if state:  # the previous step raised before its end: give the user's setting back first
            use(state["user"])
            state.clear()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.numel() > max_tokens or ids.is_cuda:
            return None
        state.update(user=torch.get_num_threads(), n=policy.choose())
        use(state["n"])
        state["t0"] = time.perf_counter()
        return None

    def post(mod, args, kwargs, out):
        if state:
            policy.record(state["n"], time.perf_counter() - state["t0"])
            use(state["user"])
            state.clear()
        return None

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True),
               module.register_forward_hook(post, with_kwargs=True)]
    module.__dict__["lensbench_threads"] = policy

    def remove() -> None:
        for h in handles:
            h.remove()
        module.__dict__.pop("lensbench_threads", None)
        if state:
            use(state.pop("user"))
            state.clear()
    return remove
