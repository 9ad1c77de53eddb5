"""DynamicLRP (Lee & Arias, 2025, "Always Keep Your Promises"): layer-wise relevance propagation at the level of
autograd operations, for any architecture. `engine.py` walks the graph, `rules.py` holds one rule per
operation type, `promises.py` rebuilds forward values the graph did not save, `attribute.py` turns a
model + text into token / layer / head relevance, `faithfulness.py` measures it against baselines.
"""
from . import rules  # noqa: F401  (registration side effect)
from .engine import LRPConfig, Report, propagate  # noqa: F401
from .registry import LRPError, Rule, RULES, register_rule  # noqa: F401
