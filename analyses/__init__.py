"""Analyzers, one module each, registered by name (see `base.py` for the contract)."""
from .base import Analyzer, make, register, registered  # noqa: F401
from . import ablation, channels, geometry, redundancy, skip_effect  # noqa: F401,E402  (registration side effect)
