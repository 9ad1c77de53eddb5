"""Analyzer contract and registry.

An analyzer is a dataclass registered by name: its parameters are explicit keyword arguments (no
logic in `__init__`), declares the capture sites it needs, and streams: `start(model)` sets up state
(attributes with a trailing underscore), `update(trace)` folds in one batch, `finish()` returns
LayerScores. Memory therefore stays bounded by one batch, however much text is analysed.

A scan (one forward per unit, as ablation) declares `steps_per_batch()` and calls `self.step()` after each
unit, so the progress bar moves per unit rather than per batch.

The registry is the spine's; the analyzers that come with lensbench live in `lensbench.analyses` and
register when that package is imported, which the registry does by name the first time it is read (the
way a plug-in is loaded), so the spine never imports the analyses' code.
"""
from __future__ import annotations

import dataclasses
from importlib import import_module
from typing import ClassVar

from .errors import LensbenchError
from .model import Model
from .profiles import LayerScores
from .trace import Trace
from .replay import DenseRun
from .jsonio import plain


class Analyzer:
    name: ClassVar[str]
    sites: ClassVar[tuple[str, ...]] = ()
    needs_lm_head: ClassVar[bool] = False
    # True when it reads the model only by running it (forwards, the LM head while scoring), so it runs on a
    # layer-by-layer model (`lensbench.offload`); weight-reading analyses leave it False and are refused there
    layer_by_layer: ClassVar[bool] = False

    def params(self) -> dict:
        """The keyword arguments it was made with (analyzers are dataclasses)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def start(self, model: Model) -> None:
        raise NotImplementedError

    def update(self, trace: Trace) -> None:
        raise NotImplementedError

    def finish(self) -> list[LayerScores]:
        raise NotImplementedError

    def steps_per_batch(self) -> int:
        """Progress steps `update` reports per batch with `step()` (after `start`; 0: one step per batch)."""
        return 0

    def step(self) -> None:
        """One unit of this batch's work is done (moves the progress bar that profile_model attached)."""
        on_step = getattr(self, "on_step_", None)
        if on_step is not None:
            on_step()


class Scan(Analyzer):
    """An analyzer whose work on a batch is independent items (one per unit, layer, level…), so an executor
    can spread them over workers (`profile --executor`).

    `items(batch)` lists a batch's items (JSON values; called in the driver, in batch order),
    `measure(dense, item)` computes one item's numbers from the batch's dense run — reading the model and
    what `start` derived, never the running sums — as a dict of floats or lists, `fold(item, result)` adds
    them in, and `end_batch(batch, items)` counts the batch. `update` does exactly this in this process; a
    worker runs `measure` and the driver folds the results in the same order, so the sums are the same.
    """

    def items(self, batch) -> list:
        raise NotImplementedError

    def measure(self, dense, item) -> dict:
        raise NotImplementedError

    def fold(self, item, result: dict) -> None:
        raise NotImplementedError

    def end_batch(self, batch, items: list) -> None:
        raise NotImplementedError

    def update(self, trace: Trace) -> None:
        dense = DenseRun.from_trace(self.model_, trace)
        items = self.items(dense.batch)
        for item in items:
            self.fold(item, plain(self.measure(dense, item)))
            self.step()
        self.end_batch(dense.batch, items)


_REGISTRY: dict[str, type[Analyzer]] = {}
BUILTIN = "lensbench.analyses"  # the package of the analyzers that come with lensbench


def _builtins() -> dict[str, type[Analyzer]]:
    import_module(BUILTIN)  # registers the built-in analyzers (a no-op once imported)
    return _REGISTRY


def register(cls: type[Analyzer]) -> type[Analyzer]:
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Analyzer]]:
    return dict(_builtins())


def check_names(names) -> None:
    """Refuse analysis names that are not registered (all of them in one line)."""
    unknown = [n for n in names if n not in _builtins()]
    if unknown:
        raise LensbenchError(f"unknown analysis {', '.join(map(repr, unknown))}: available are "
                             f"{', '.join(sorted(_REGISTRY))}")


def make(name: str, **params) -> Analyzer:
    check_names([name])
    try:
        return _REGISTRY[name](**params)
    except TypeError as exc:
        raise LensbenchError(f"bad parameters for analysis {name!r}: {exc}") from None

