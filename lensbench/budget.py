"""Memory budget of a layer-by-layer run: an estimate from the model's shapes, checked against a cap before any
weight is read, so a model that does not fit even layer by layer is refused in one line instead of being killed
by the OS part-way.

The estimate (bytes, at the dtype the model runs in, 4 bytes for float32):
  weights      the largest set of parameters one module holds (`offload.piece_bytes`: the embedding or the
               LM head, which a scan holds while it scores against the vocabulary, or a wide MLP projection);
               modules run one at a time, so no two are in memory together
  activations  per batch of B × T tokens: the states every layer keeps for the batch (5 sites per layer:
               before, between and after its sublayers and both sublayers' outputs), one block's intermediates
               (MLP width × 3, attention scores heads × T per token) and the model's logits (vocab per token);
               and the scoring against the vocabulary, in float64 chunks of `replay.SCORE_CHUNK` tokens with
               about 4 vocabulary-wide temporaries alive
It is checked against what the benchmark measures (benchmarks/scale.py, reports/SCALE.md).
"""
from __future__ import annotations

from .errors import LensbenchError
from .model import Model
from .offload import is_offloaded, piece_bytes
from .replay import SCORE_CHUNK


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated now without swapping)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: no cap


def estimate(model: Model, batch_size: int, seq_len: int) -> tuple[int, int]:
    """(weight bytes, activation bytes) a layer-by-layer run of `batch_size` × `seq_len` tokens holds at most."""
    module = model.module
    element = next(module.parameters()).element_size()
    cfg = module.config
    text = getattr(cfg, "text_config", None) or cfg
    vocab = getattr(text, "vocab_size", 0) if model.is_causal_lm else 0
    inner = getattr(text, "intermediate_size", None) or 4 * model.d_model
    heads = model.adapter.n_heads
    tokens = batch_size * seq_len
    per_token = 5 * model.n_layers * model.d_model + 3 * inner + heads * seq_len + vocab
    scoring = 4 * min(tokens, SCORE_CHUNK) * vocab * 8
    return piece_bytes(module), tokens * per_token * max(element, 4) + scoring


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(model: Model, batch_size: int, seq_len: int, cap: int | None = None) -> None:
    """Refuse a layer-by-layer run whose estimate exceeds `cap` (default: the memory available now), naming
    both; a model loaded whole is not checked (its weights are already in memory)."""
    if not is_offloaded(model.module):
        return
    cap = available_bytes() if cap is None else cap
    weights, activations = estimate(model, batch_size, seq_len)
    if weights + activations > cap:
        raise LensbenchError(
            f"{model.name} needs about {gib(weights + activations)} even layer by layer ({gib(weights)} of weights "
            f"in its largest module, {gib(activations)} of activations for {batch_size} x {seq_len} "
            f"tokens), more than the cap of {gib(cap)}: lower --batch-size or --seq-len, or raise --memory-cap")
