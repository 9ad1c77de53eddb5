"""The decision layer: plans, the policies that make them, executing them, measuring them, saving them.

    from lensbench.compress.plan import Plan, Drop, Quant      # typed actions, JSON on disk
    from lensbench.compress.policies import make_plan          # registered policies, typed configs
    from lensbench.compress.apply import apply                 # execute a plan for real (a context)
    from lensbench.compress.evaluate import evaluate           # quality, speed, bytes vs the dense model
    lensbench.compress(model, plan, format="gguf", out="dir")  # a checkpoint other tools load

Submodules are imported when used, so reading a plan does not import the kernels or the writers.
"""
from __future__ import annotations

import sys
import types
from importlib import import_module


class _CallablePackage(types.ModuleType):
    """`lensbench.compress` is this package and also the function that saves a checkpoint, so the public
    name `lensbench.compress(...)` keeps working whichever of the two a user imported first."""

    def __call__(self, model, plan, **kwargs):
        """`lensbench.compress(model, plan, format="hf"|"gguf"|"compressed-tensors", out=DIR)`: see
        `lensbench.compress.save.compress`."""
        return import_module(".save", __name__).compress(model, plan, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage


def __getattr__(name: str):
    """`from lensbench.compress import compress, Saved`: the saving function and its result, on first use."""
    if name in ("compress", "Saved"):
        return getattr(import_module(".save", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
