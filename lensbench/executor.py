"""Executors: one interface that runs a sweep's independent work items serially, in local processes, or on
a Ray cluster, with the same results.

A sweep hands `run_items` a `Work` (what one worker sets up once and then does per item) and its items
(JSON values, in a fixed order). Each worker gets the model once: `ship` packs its weights, config and
tokenizer (no files needed on the worker's machine), `land` rebuilds it; on Ray the package goes into the
object store once and every worker on that node reads it from there. Results come back as JSON values and
are returned in item order, so a fold over them is the same whatever ran them. A search that scores one
generation after another uses `Workers` directly: started once, one `map(items)` per generation.

Faults: a worker that dies (killed, out of memory) has its items retried on a new worker, up to `retries`
times; a worker that raises stops the sweep with that item's one-line error. With `resume` (a folder)
every finished item is written there atomically as it arrives, and a rerun of the same sweep (same key)
only does the items that are missing, so a killed driver loses nothing and no item is counted twice.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from .atomic import write_text
from .jsonio import plain
from .load import from_module
from .errors import LensbenchError
from .model import Model
from .offload import is_offloaded

EXECUTORS = ("serial", "process", "ray")
LOCAL = "127.0.0.1"
CONNECT_TIMEOUT = 3.0  # seconds to reach a Ray address before it is called unreachable


@dataclass(frozen=True)
class ExecutorConfig:
    """How a sweep runs: `kind` serial|process|ray, `workers` (None: one per CPU, or per cluster CPU),
    `address` of a running Ray cluster (None: start a local one on 127.0.0.1), `retries` per died worker."""

    kind: str = "serial"
    workers: int | None = None
    address: str | None = None
    retries: int = 3

    def check(self) -> "ExecutorConfig":
        if self.kind not in EXECUTORS:
            raise LensbenchError(f"unknown executor {self.kind!r}: use one of {', '.join(EXECUTORS)}")
        if self.workers is not None and self.workers < 1:
            raise LensbenchError(f"--workers must be 1 or more, got {self.workers}")
        if self.address is not None and self.kind != "ray":
            raise LensbenchError(f"--ray-address is for --executor ray, not {self.kind}: add --executor ray or drop "
                                 f"--ray-address")
        if self.address is not None:
            reachable(self.address)
        return self


class Work(Protocol):
    """What a worker does: `setup(model)` once, then `run(item)` per item; both in the worker's process."""

    def setup(self, model: Model) -> None: ...

    def run(self, item: Any) -> Any: ...


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class Shipped:
    """A model as plain parts: its class, config, tokenizer, card and every parameter and buffer as a numpy
    array (tied tensors once, by index), so it crosses process and machine boundaries without its files."""

    cls: type
    config: Any
    tokenizer: Any
    card: dict
    names: list[tuple[str, bool, int]]  # (qualified name, is a parameter, index into arrays)
    arrays: list[np.ndarray]
    dtypes: list[str]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def ship(model: Model) -> Shipped:
    if is_offloaded(model.module):
        raise LensbenchError("a layer-by-layer model runs in this process only (its weights stay in its files): "
                             "drop --executor, or load the model whole to run on workers")
    model.fingerprint()  # computed once here, carried in the card
    seen: dict[int, int] = {}
    names, arrays, dtypes = [], [], []
    module = model.module
    for is_param, items in ((True, module.named_parameters(remove_duplicate=False)),
                            (False, module.named_buffers(remove_duplicate=False))):
        for name, t in items:
            key = id(t)
            if key not in seen:
                seen[key] = len(arrays)
                dtypes.append(str(t.dtype).removeprefix("torch."))
                # numpy has no bfloat16: such tensors travel as their int16 bits
                data = t.detach().cpu().contiguous()
                arrays.append((data.view(torch.int16) if t.dtype == torch.bfloat16 else data).numpy())
            names.append((name, is_param, seen[key]))
    return Shipped(type(module), module.config, model.tokenizer, dict(model.card), names, arrays, dtypes)


def land(shipped: Shipped) -> Model:
    """The model again, each tensor a writable copy owned by this process (analyses edit weights in place)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = shipped.cls(shipped.config)
    tensors = []
    for array, dtype in zip(shipped.arrays, shipped.dtypes, strict=True):
        t = torch.from_numpy(np.array(array, copy=True))
        tensors.append(t.view(torch.bfloat16) if dtype == "bfloat16" else t)
    params: dict[int, torch.nn.Parameter] = {}
    for name, is_param, index in shipped.names:
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if is_param:
            p = params.setdefault(index, torch.nn.Parameter(tensors[index], requires_grad=False))
            sub._parameters[leaf] = p
        else:
            sub._buffers[leaf] = tensors[index]
    left = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise LensbenchError(f"could not rebuild {shipped.card.get('name')} in a worker: {left[0]} has no weights")
    return from_module(module, shipped.tokenizer, card=shipped.card)


# ------------------------------------------------------------------------------------------ the workers


class _Worker:
    """One worker's state: the model, landed once, and the work set up on it."""

    def __init__(self, shipped: Shipped | None, work: Work, threads: int):
        torch.set_num_threads(threads)
        self.work, self.ready = work, False
        if shipped is not None:
            self._setup(shipped)

    def _setup(self, shipped: Shipped) -> None:
        self.work.setup(land(shipped))
        self.ready = True

    def run(self, index: int, item: Any, shipped: list | None = None) -> tuple[int, Any]:
        """One item; on Ray, `shipped` is [the model's object ref], fetched from this node's object store by a
        worker's first item (also after a restart: Ray warns about refs among an actor's constructor arguments)."""
        if not self.ready:
            self._setup(ray_module().get(shipped[0]))
        return index, self.work.run(item)


_PROCESS_WORKER: _Worker | None = None


def _process_init(shipped: Shipped, work: Work, threads: int) -> None:
    global _PROCESS_WORKER
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    _PROCESS_WORKER = _Worker(shipped, work, threads)


def _exit_with(parent: int) -> None:
    """End this worker when its driver is gone: a pool's workers wait on its queue forever otherwise, each
    holding a copy of the model, after the driver is killed (the driver's rerun resumes with new workers)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _process_run(index: int, item: Any) -> tuple[int, Any]:
    assert _PROCESS_WORKER is not None
    return _PROCESS_WORKER.run(index, item)


class ItemFailed(LensbenchError):
    """One item raised in a worker; the sweep stops (finished items are kept in the resume folder)."""


def _failed(item: Any, exc: BaseException) -> ItemFailed:
    """The same one line from every executor: the item, then the error's first line."""
    text = str(exc).strip().splitlines()
    what = "" if isinstance(exc, LensbenchError) else f"{type(exc).__name__}: "
    return ItemFailed(f"work item {json.dumps(item)} failed: {what}{text[0] if text else ''}")


# ---------------------------------------------------------------------------------------------- resume


class Finished:
    """The finished items of one sweep in a folder: one JSON file per item, written atomically, and the
    sweep's key; a folder of another sweep is cleared, never mixed in."""

    def __init__(self, folder: Path | None, key: str):
        self.folder, self.key = folder, key
        self.results: dict[int, Any] = {}
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "key"
        if key_file.is_file() and key_file.read_text().strip() != key:
            for old in folder.glob("item-*.json"):
                old.unlink()
        write_text(key_file, key)
        for path in folder.glob("item-*.json"):
            try:
                doc = json.loads(path.read_text())
                self.results[int(doc["index"])] = doc["result"]
            except (ValueError, KeyError, OSError):
                path.unlink(missing_ok=True)  # a damaged file is only lost time: the item runs again

    def forget(self, index: int) -> None:
        """Run item `index` again (what it wrote elsewhere was lost)."""
        self.results.pop(index, None)
        if self.folder is not None:
            (self.folder / f"item-{index:08d}.json").unlink(missing_ok=True)

    def add(self, index: int, result: Any) -> None:
        self.results[index] = result
        if self.folder is not None:
            # NaN is kept (a score can be undefined); these files are read back only here
            write_text(self.folder / f"item-{index:08d}.json", json.dumps({"index": index, "result": result}))


# ------------------------------------------------------------------------------------------------ run


def run_items(work: Work, model: Model, items: Sequence[Any], config: ExecutorConfig | None = None, *,
              resume: Path | None = None, key: str = "",
              on_done: Callable[[int, Any], None] | None = None,
              lost: Callable[[int], bool] | None = None) -> list[Any]:
    """Every item's result, in item order. Items already in `resume` (a finished item of this `key`) are not
    run again, unless `lost(index)` says what the item wrote elsewhere is gone; `on_done(index, result)` is
    called in this process as each item finishes (a progress bar, a manifest), in the order they finish."""

    finished = Finished(resume, key)
    for index in [i for i in finished.results if lost is not None and lost(i)]:
        finished.forget(index)
    todo = [i for i in range(len(items)) if i not in finished.results]
    for index, result in sorted(finished.results.items()):
        if on_done:
            on_done(index, result)

    def done(index: int, result: Any) -> None:
        finished.add(index, result)
        if on_done:
            on_done(index, result)

    if todo:
        with Workers(work, model, config, most=len(todo)) as workers:
            workers.map([items[i] for i in todo], lambda j, result: done(todo[j], result))
    return [finished.results[i] for i in range(len(items))]


class Workers:
    """Workers started once and kept for several rounds of items (a search's generations): each gets the model
    and sets the work up once; `map(items)` runs one round on them and returns its results in item order.
    `most` caps the workers at the items there are (said when it lowers --workers)."""

    def __init__(self, work: Work, model: Model, config: ExecutorConfig | None = None, most: int | None = None):
        self.work, self.model, self.config = work, model, (config or ExecutorConfig()).check()
        self.most = most

    def __enter__(self) -> "Workers":
        kind, asked = self.config.kind, self.config.workers
        if kind != "serial" and asked is not None and self.most is not None and asked > self.most:
            print(f"lensbench: {asked} workers asked for {self.most} items: using {self.most}", file=sys.stderr)
        self.impl = {"serial": _Serial, "process": _Processes, "ray": _Ray}[kind](self)
        return self

    def __exit__(self, *exc) -> None:
        self.impl.close()

    def count(self, available: int) -> int:
        return min(self.config.workers or available, self.most or available)

    def map(self, items: Sequence[Any], done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Every item's result (JSON values), in order; `done(index, result)` as each finishes."""
        results: dict[int, Any] = {}

        def finish(index: int, result: Any) -> None:
            results[index] = result = plain(result)
            if done:
                done(index, result)

        if items:
            self.impl.map(list(items), finish)
        return [results[i] for i in range(len(items))]


class _Serial:
    def __init__(self, workers: Workers):
        self.work = workers.work
        self.work.setup(workers.model)

    def map(self, items, done) -> None:
        for i, item in enumerate(items):
            try:
                result = self.work.run(item)
            except Exception as exc:
                raise _failed(item, exc) from exc
            done(i, result)

    def close(self) -> None:
        pass


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


class _Processes:
    """Spawned local processes (no fork of a threaded torch process), each with the model landed once; a pool
    that breaks (a worker killed) is replaced and gets the round's unfinished items, up to `retries` times."""

    def __init__(self, workers: Workers):
        self.n = workers.count(os.cpu_count() or 1)
        self.work, self.retries = workers.work, workers.config.retries
        self.shipped = ship(workers.model)
        self.deaths = 0
        self.pool = self._pool()

    def _pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(self.n, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_process_init, initargs=(self.shipped, self.work, _threads(self.n)))

    def map(self, items, done) -> None:
        left = set(range(len(items)))
        while left:
            futures = {self.pool.submit(_process_run, i, items[i]): i for i in sorted(left)}
            try:
                for fut in cf.as_completed(futures):
                    try:
                        index, result = fut.result()
                    except cf.process.BrokenProcessPool:
                        raise
                    except Exception as exc:
                        raise _failed(items[futures[fut]], exc) from exc
                    done(index, result)
                    left.discard(index)
            except cf.process.BrokenProcessPool:
                self.deaths += 1
                if self.deaths > self.retries:
                    raise LensbenchError(f"workers died {self.deaths} times (killed or out of memory) with {len(left)} "
                                         f"items left: rerun with fewer --workers to continue from the finished "
                                         f"items") from None
                print(f"lensbench: a worker died; its {len(left)} unfinished items go to new workers", file=sys.stderr)
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = self._pool()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------- Ray


def _host(address: str) -> str:
    return address.split("://", 1)[-1].rpartition(":")[0]


def reachable(address: str) -> None:
    """Refuse a Ray address nothing answers at, within CONNECT_TIMEOUT (ray.init itself retries for minutes)."""
    if address in ("auto", "local"):
        return
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise LensbenchError(f"--ray-address {address!r} must look like HOST:PORT (e.g. 127.0.0.1:6379) or "
                             f"ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise LensbenchError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with "
                             f"`ray start --head`, or leave out --ray-address to start a local one") from None


def ray_module():
    try:
        import ray  # optional: the ray extra
    except ImportError:
        raise LensbenchError("--executor ray needs Ray: pip install 'lensbench[ray]'") from None
    return ray


_LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK_DEFAULT = os.environ.get(_LOOPBACK_ONLY, "1")
_CONNECTED: list = [None]  # the address this process's Ray is connected to (None: the local one it started)


def connect(config: ExecutorConfig):
    """ray, initialised: the given cluster, or a local one on 127.0.0.1 (left running for later sweeps)."""
    ray = ray_module()
    if ray.is_initialized() and _CONNECTED[0] != config.address:
        ray.shutdown()
    if not ray.is_initialized():
        _CONNECTED[0] = config.address
        # Ray's switch for a node that is no cluster's: every server of a local Ray (GCS, raylet, object
        # manager, workers) then binds 127.0.0.1 instead of all interfaces. It is read when ray is imported
        # (the module constant) and by the processes Ray starts (the environment), so both are set.
        # A cluster at a loopback address is one on this host that binds loopback: this driver must too.
        loopback = config.address is None or _host(config.address) in ("127.0.0.1", "localhost", "::1")
        os.environ[_LOOPBACK_ONLY] = "0" if loopback else _LOOPBACK_DEFAULT
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = not loopback
        if config.address is None:
            # "local": a new Ray of this process's own, never one that `ray start` left on this machine
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address=LOCAL,
                     logging_level=logging.ERROR, log_to_driver=False)
        else:
            try:
                ray.init(address=config.address, logging_level=logging.ERROR, log_to_driver=False)
            except Exception as exc:  # Ray raises many types here (connection, authentication, version)
                lines = [line for line in str(exc).splitlines() if line.strip()]
                raise LensbenchError(f"could not join the Ray cluster at {config.address}: "
                                     f"{lines[-1].strip() if lines else type(exc).__name__} (a cluster with token "
                                     f"authentication needs RAY_AUTH_MODE=token and its token, as Ray's docs "
                                     f"say)") from None
    return ray


class _Ray:
    """Ray actors, each with the model from the object store (put once per sweep) and the work set up once;
    Ray restarts a killed actor and retries its items (`max_restarts`, `max_task_retries`)."""

    def __init__(self, workers: Workers):
        ray = self.ray = connect(workers.config)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = workers.count(cpus)
        if n > cpus:
            print(f"lensbench: {n} workers asked for a cluster of {cpus} CPUs: using {cpus}", file=sys.stderr)
            n = cpus
        threads = max(1, cpus // n)
        self.retries = workers.config.retries
        self.shipped = ray.put(ship(workers.model))  # once; workers on the same node read it from the object store
        # one CPU each to place them, so n of them always fit however the CPUs are spread over nodes (an actor
        # that asked for more than any node has left would wait forever); torch gets the cluster's share
        remote = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=self.retries)(_Worker)
        self.actors = [remote.remote(None, workers.work, threads) for _ in range(n)]

    def map(self, items, done) -> None:
        ray = self.ray
        pending: dict[Any, tuple[int, Any]] = {}  # ref -> (item index, actor)
        queue = list(range(len(items)))

        def feed(actor) -> None:
            if queue:
                i = queue.pop(0)
                ref = actor.run.remote(i, items[i], [self.shipped])  # in a list: fetched only by a worker not set up
                pending[ref] = (i, actor)

        for actor in self.actors:
            for _ in range(2):  # two in flight per worker: the next item is there when one finishes
                feed(actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(ready[0])
            try:
                index, result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                raise _failed(items[i], exc.cause if exc.cause is not None else exc) from None
            except ray.exceptions.RayActorError:
                raise LensbenchError(f"a Ray worker died more than {self.retries} times on item "
                                     f"{json.dumps(items[i])}; rerun to continue from the finished items") from None
            done(index, result)
            feed(actor)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
