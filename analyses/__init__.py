"""Analyzers, one module each, registered by name (see `base.py` for the contract)."""
from ..analyzer import Analyzer, check_names, make, register, registered  # noqa: F401
from . import ablation, channels, geometry, kv_sensitivity, quant_sensitivity, redundancy, skip_effect  # noqa: F401,E402  (registration side effect)
