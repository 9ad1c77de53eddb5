"""Server-side state of the app: the opened Profiles (keyed, never sent whole to the browser), loaded
models and background jobs. Callbacks receive keys and read from here.

Profiles are opened only from the paths given on the command line (no page takes a path from user
input); one that fails to load is kept as an error message and shown as such. Profiles are JSON +
safetensors, never unpickled.
"""
from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from lensbench.errors import LensbenchError
from lensbench.profiles import Profile
from lensbench.load import load
from lensbench.profiling import model_source


@dataclass
class Opened:
    key: str
    path: str
    profile: Profile | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        if self.profile is None:
            return f"{Path(self.path).name} (cannot be opened)"
        return f"{self.profile.model.get('name', '?')} — {self.path}"


@dataclass
class Job:
    """A background job: `fn(progress)` runs in a thread; `progress(fraction, message)` reports."""

    id: str
    kind: str
    fraction: float = 0.0
    message: str = "queued"
    result: object = None
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.time)


class State:
    def __init__(self, paths, model_loader=None):
        self.opened: dict[str, Opened] = {}
        for i, p in enumerate(paths):
            key = f"p{i}"
            try:
                self.opened[key] = Opened(key, str(p), profile=Profile.load(p))
            except LensbenchError as exc:
                self.opened[key] = Opened(key, str(p), error=str(exc))
            except Exception as exc:  # a foreign or corrupt file must not take the app down
                self.opened[key] = Opened(key, str(p), error=f"{type(exc).__name__}: {exc}")
        self.jobs: dict[str, Job] = {}
        self._models: dict[str, object] = {}
        self._model_lock = threading.Lock()
        self._load = model_loader
        self.evaluations: list[dict] = []  # plan evaluations measured in this session (plan explorer)
        self._memo: OrderedDict = OrderedDict()
        self._memo_lock = threading.Lock()
        self.memo_size = 256

    def memo(self, key: tuple, build):
        """`build()` computed once per `key` (opened profiles never change, so figures and tables
        derived from them can be reused across callbacks); the `memo_size` most recent are kept."""
        with self._memo_lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        value = build()  # outside the lock: two callbacks may build the same value; both are equal
        with self._memo_lock:
            self._memo[key] = value
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return value

    # --- profiles --------------------------------------------------------------------------
    def options(self) -> list[dict]:
        return [{"label": o.label, "value": k} for k, o in self.opened.items()]

    def first_key(self) -> str | None:
        good = [k for k, o in self.opened.items() if o.profile is not None]
        return good[0] if good else next(iter(self.opened), None)

    def get(self, key: str | None) -> Opened | None:
        return self.opened.get(key) if key else None

    # --- models ----------------------------------------------------------------------------
    def model_for(self, profile: Profile):
        """The profile's model (bundled name, directory or hub name from its card), loaded once."""

        source = model_source(profile.model)
        with self._model_lock:
            if source not in self._models:
                model = (self._load or load)(source)
                profile.check_model(model)
                self._models[source] = model
            return self._models[source]

    # --- jobs ------------------------------------------------------------------------------
    def submit(self, kind: str, fn) -> str:
        job = Job(uuid.uuid4().hex[:12], kind)
        self.jobs[job.id] = job

        def progress(fraction: float, message: str) -> None:
            job.fraction, job.message = float(fraction), message

        def run() -> None:
            try:
                job.result = fn(progress)
                job.fraction, job.message = 1.0, "done"
            except LensbenchError as exc:
                job.error = str(exc)
            except Exception as exc:  # shown in the page, with the type, not a stack trace
                job.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                job.done = True

        threading.Thread(target=run, daemon=True, name=f"lensbench-{kind}-{job.id}").start()
        return job.id
