"""Checkpoint formats `lensbench compress` writes; importing this package registers them all."""
from . import ctensors, gguf, hf  # noqa: F401  (each module registers its writer)
from .registry import FORMATS, register

__all__ = ["FORMATS", "register"]
