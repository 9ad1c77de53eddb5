"""A quantised KV cache for real decoding: per layer key and value bits, stored packed (`gpu.kvquant`).

`KVCache` is a transformers `Cache`, so `model(..., cache=KVCache(...))` and `generate` run it unchanged.
Each layer with a `KVSpec` keeps its keys and values packed at `k_bits` / `v_bits` in {8, 4, 2}
(asymmetric min-max, float16 scale and min), except a full-precision window of the `window` most
recent tokens; other layers keep the dense states. Two layouts (KIVI, arXiv 2402.02750; KVTuner, arXiv
2502.04420):

* `axis="token"`: keys and values both quantised per token, one group per head (head_dim values);
* `axis="channel"`: keys per channel over blocks of `group` tokens (KIVI), values per token. Keys leave
  the window only in whole blocks, so up to `window + group - 1` recent keys stay in full precision.

What a layer returns to attention: on the call that fills an empty cache (the prompt) the states as
given, so the prompt attends in full precision as in KIVI and transformers' QuantizedCache; on later
calls the dequantised packed states followed by the window, or, for a one-token decode step on a model
switched to `lensbench_sdpa` (`use_packed_attention`), a zero-stride marker from which `packed_sdpa` reads
the codes directly (`gpu.kvattention`). Quantised states are appended into buffers that grow in place, never
re-quantised. Sliding-window layers (Gemma-3's local attention) keep only the tokens their window can
still see, as transformers' own sliding layers do. Memory is measured from the tensors held
(`cache_bytes`), not estimated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.cache_utils import (Cache, DynamicLayer, DynamicSlidingWindowLayer,
                                      get_layer_types_and_kwargs)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .errors import LensbenchError
from .numeric import storage_bytes
from .gpu import kvattention, kvquant
from .gpu.kvquant import KV_BITS, Packed
from .gpu.quant import dequantized, grid, round_to_grid

AXES = ("token", "channel")
PAIRS = ((8, 8), (8, 4), (4, 8), (4, 4), (8, 2), (4, 2), (2, 4), (2, 2))  # KVTuner's candidate (K, V) bits


def pair_name(k_bits: int, v_bits: int) -> str:
    """KVTuner's name for a (K bits, V bits) pair: KV8, K8V4, ..."""
    return f"KV{k_bits}" if k_bits == v_bits else f"K{k_bits}V{v_bits}"


@dataclass(frozen=True)
class KVSpec:
    """One layer's cache precision: key and value bits, layout, KIVI's key block and the full-precision
    window of recent tokens."""

    k_bits: int = 8
    v_bits: int = 8
    axis: str = "token"
    group: int = 32  # tokens per key block with axis="channel"
    window: int = 0

    def __post_init__(self):
        for what in ("k_bits", "v_bits"):
            b = getattr(self, what)
            if isinstance(b, bool) or b not in KV_BITS:
                raise LensbenchError(f"KV {what}={b!r} is not supported: use one of {', '.join(map(str, KV_BITS))}")
        if self.axis not in AXES:
            raise LensbenchError(f"KV axis {self.axis!r} is not known: use one of {', '.join(AXES)}")
        for what in ("group", "window"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if what == "group" else 0):
                raise LensbenchError(f"KV {what}={v!r} must be a {'positive' if what == 'group' else 'non-negative'} "
                                     f"integer")

    @property
    def bits(self) -> float:
        """Equivalent bits per cached element, (K bits + V bits) / 2."""
        return (self.k_bits + self.v_bits) / 2

    @property
    def name(self) -> str:
        return pair_name(self.k_bits, self.v_bits)


def flushed(total: int, spec: KVSpec, keys: bool) -> int:
    """How many of `total` tokens are held packed (the rest are the full-precision window)."""
    excess = max(0, total - spec.window)
    return excess - excess % spec.group if keys and spec.axis == "channel" else excess


def pack_states(x: torch.Tensor, bits: int, per_channel: int = 0) -> Packed:
    """States [B, H, T, D] packed per token, or per channel over blocks of `per_channel` tokens."""
    if per_channel:
        x = x.unflatten(2, (-1, per_channel)).transpose(-1, -2)  # [B, H, T/G, D, G]
    return kvquant.quantize(x, bits)


def unpack_states(p: Packed, dtype: torch.dtype, per_channel: int = 0) -> torch.Tensor:
    x = kvquant.dequantize(p, dtype)
    return x.transpose(-1, -2).flatten(2, 3) if per_channel else x


class _Half:
    """One of a layer's two halves (keys or values): packed past + full-precision window. The packed past lives
    in buffers with room to grow (by a quarter at least), so a decode step writes only its own token."""

    def __init__(self, bits: int, per_channel: int):
        self.bits, self.per_channel = bits, per_channel
        self.buf: Packed | None = None  # capacity along dim 2 (tokens, or key blocks)
        self.used = 0
        self.n_packed = 0
        self.window: torch.Tensor | None = None

    @property
    def packed(self) -> Packed | None:
        if self.buf is None or not self.used:
            return None
        return Packed(*(t[:, :, :self.used] for t in self.buf[:3]), self.bits)

    def _store(self, new: Packed) -> None:
        n = new.codes.shape[2]
        if self.buf is None or self.used + n > self.buf.codes.shape[2]:
            cap = max(self.used + n, (self.used + n) * 5 // 4, 16)
            grown = Packed(*(t.new_empty((*t.shape[:2], cap, *t.shape[3:])) for t in new[:3]), self.bits)
            for dst, src in zip(grown[:3], self.buf[:3] if self.buf is not None else (), strict=False):
                dst[:, :, :self.used] = src[:, :, :self.used]
            self.buf = grown
        for dst, src in zip(self.buf[:3], new[:3], strict=True):
            dst[:, :, self.used:self.used + n] = src
        self.used += n

    def append(self, x: torch.Tensor, n_flushed: int) -> None:
        self.window = x if self.window is None else torch.cat([self.window, x], dim=-2)
        move = n_flushed - self.n_packed
        if move > 0:
            self._store(pack_states(self.window[:, :, :move], self.bits, self.per_channel))
            self.window = self.window[:, :, move:].clone()  # a view would keep the whole float states alive
            self.n_packed = n_flushed

    def states(self) -> torch.Tensor:
        packed = self.packed
        if packed is None:
            return self.window
        return torch.cat([unpack_states(packed, self.window.dtype, self.per_channel), self.window], dim=-2)

    def drop_front(self, n: int) -> None:
        """Forget the `n` oldest tokens (whole key blocks only while they are packed)."""
        from_packed = min(n, self.n_packed)
        if from_packed:
            k = from_packed // (self.per_channel or 1)
            self.used -= k
            self.n_packed -= from_packed
            keep = self.buf.codes.shape[2] - k
            if keep > 2 * self.used + 16:  # most of the buffer is forgotten: hand its memory back
                keep = self.used * 5 // 4 + 16
            self.buf = Packed(*(t[:, :, k:k + keep].clone() if keep < t.shape[2] - k else t[:, :, k:]
                                for t in self.buf[:3]), self.bits)
        if n > from_packed:
            self.window = self.window[:, :, n - from_packed:].clone()

    def droppable(self, n: int) -> int:
        """How many of the `n` oldest tokens can be forgotten now (key blocks go whole)."""
        if n <= self.n_packed and self.per_channel:
            return n - n % self.per_channel
        return n

    def tensors(self) -> list[torch.Tensor]:
        return [*(self.buf[:3] if self.buf is not None else ()), *([self.window] if self.window is not None else [])]


def _packed_marker(layer: "PackedKVLayer", like: torch.Tensor) -> torch.Tensor:
    """What a fused decode step returns instead of dequantised states: a zero-stride tensor of their shape
    (no memory) that points attention (`packed_sdpa`) at the layer's packed states."""
    b, h, _, d = like.shape
    marker = like.new_zeros(()).expand(b, h, layer.held, d)
    marker.kv_layer = layer
    return marker


class PackedKVLayer(DynamicLayer):
    """One layer's quantised cache (see the module docstring); `sliding_window` for local-attention layers."""

    is_croppable = False

    def __init__(self, spec: KVSpec, sliding_window: int | None = None, fused: bool = False):
        super().__init__()
        self.spec, self.sliding_window = spec, sliding_window
        self.fused = fused and sliding_window is None  # decode steps hand attention the packed states
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0  # tokens seen
        self.held = 0  # tokens kept (all of them, except what a sliding window no longer sees)
        self.k = _Half(spec.k_bits, spec.group if spec.axis == "channel" else 0)
        self.v = _Half(spec.v_bits, 0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        prompt = self.held == 0
        n = key_states.shape[-2]
        self.cumulative_length += n
        self.held += n
        self.k.append(key_states, flushed(self.held, self.spec, keys=True))
        self.v.append(value_states, flushed(self.held, self.spec, keys=False))
        if prompt:
            out = key_states, value_states
        elif self.fused and n == 1:
            out = _packed_marker(self, key_states), _packed_marker(self, value_states)
        else:
            out = self.k.states(), self.v.states()
        if self.is_sliding and self.held > self.sliding_window - 1:
            drop = self.k.droppable(self.held - (self.sliding_window - 1))
            self.k.drop_front(drop)
            self.v.drop_front(drop)
            self.held -= drop
        return out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held + query_length, self.cumulative_length - self.held

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self.__init__(self.spec, self.sliding_window, self.fused)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise LensbenchError("the quantised KV cache does not reorder for beam search: decode greedily or sample")

    @property
    def nbytes(self) -> int:
        """Bytes of memory the layer holds (whole storages: the buffers' spare room included)."""
        return storage_bytes(self.k.tensors() + self.v.tensors())


class KVCache(Cache):
    """A cache for `config`'s decoder with `specs` `{cache layer index: KVSpec}`; other layers stay dense.

        >>> cache = lb.KVCache(model.module.config, {i: lb.KVSpec(4, 4) for i in range(model.n_layers)})
        >>> inputs = model.tokenize(["The capital of France is Paris."]).model_inputs()
        >>> out = model.module(**inputs, cache=cache, use_cache=True)
        >>> dense = model.module(**inputs, use_cache=True).cache
        >>> lb.cache_bytes(cache) < lb.cache_bytes(dense) / 2       # packed codes + float16 scales
        True
    """

    def __init__(self, config, specs: dict[int, KVSpec]):
        text = config.get_text_config(decoder=True)
        types, kwargs = get_layer_types_and_kwargs(text)
        fused = getattr(text, "_attn_implementation", None) == PACKED_SDPA
        if set(specs) - set(range(len(types))):
            raise LensbenchError(f"KV specs name layers {sorted(set(specs) - set(range(len(types))))}, but the "
                                 f"model has {len(types)} attention layers")
        layers = []
        for i, (kind, kw) in enumerate(zip(types, kwargs, strict=False)):
            window = kw.get("sliding_window") if kind == "sliding_attention" else None
            if kind not in ("full_attention", "sliding_attention"):
                raise LensbenchError(f"layer {i} is {kind!r}: the quantised KV cache supports full and sliding "
                                     f"attention only")
            if i in specs:
                layers.append(PackedKVLayer(specs[i], window, fused))
            else:
                layers.append(DynamicSlidingWindowLayer(window) if window else DynamicLayer())
        super().__init__(layers=layers)
        self.specs = dict(specs)


PACKED_SDPA = "lensbench_sdpa"  # sdpa, plus decode steps read straight from a packed cache


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                **kwargs):
    """transformers' sdpa attention, except where `key` is a packed layer's marker (a decode step through a
    `KVCache` with fused decoding): then attention reads the packed codes directly (`gpu.kvattention`)."""
    layer = getattr(key, "kv_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype).reshape(b, hkv, (hq // hkv) * q_len, d)
    scale = d ** -0.5 if scaling is None else scaling
    parts = []
    if layer.k.packed is not None:
        parts.append(kvattention.scores(q, layer.k.packed, layer.k.per_channel))
    if layer.k.window is not None and layer.k.window.shape[2]:
        parts.append(q @ layer.k.window.to(dtype).transpose(-1, -2))
    logits = torch.cat(parts, -1).mul_(scale)
    if attention_mask is not None:
        grouped = logits.view(b, hkv, hq // hkv, q_len, -1)
        mask = attention_mask[:, :, None, :, -logits.shape[-1]:]
        if mask.dtype == torch.bool:
            grouped.masked_fill_(~mask, float("-inf"))
        else:
            grouped.add_(mask.to(dtype))
    p = torch.softmax(logits, -1)
    cut = layer.v.n_packed
    out = p[..., cut:] @ layer.v.window.to(dtype) if cut < p.shape[-1] else None
    if cut:
        packed = kvattention.weighted(p[..., :cut].contiguous(), layer.v.packed)
        out = packed if out is None else out.add_(packed)
    out = out.reshape(b, hq, q_len, d).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_packed_attention(module) -> Callable[[], None]:
    """Switch a transformers model on sdpa attention to `packed_sdpa`, so `KVCache`s made for it afterwards
    decode from their packed states; returns the function that switches it back. Other attention
    implementations are left alone (their caches dequantise instead)."""
    config = module.config.get_text_config(decoder=True)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return lambda: None
    module.set_attn_implementation(PACKED_SDPA)
    return lambda: module.set_attn_implementation("sdpa")


def cache_bytes(cache: Cache) -> int:
    """Bytes of memory the keys and values of `cache` hold now (packed codes, scales, windows, dense states;
    whole storages, so a dense sliding layer's view of a longer prompt counts what it keeps alive)."""
    tensors = []
    for layer in cache.layers:
        if isinstance(layer, PackedKVLayer):
            tensors += layer.k.tensors() + layer.v.tensors()
        elif getattr(layer, "keys", None) is not None:
            tensors += [layer.keys, layer.values]
    return storage_bytes(tensors)


def reference_states(x: torch.Tensor, spec: KVSpec, keys: bool) -> torch.Tensor:
    """What a packed layer holding all of `x` [B, H, T, D] returns (dequantised past + window), computed
    from scratch with no packing: the reference the packed cache is tested against."""
    bits = spec.k_bits if keys else spec.v_bits
    n = flushed(x.shape[2], spec, keys)
    past, recent = x[:, :, :n].float(), x[:, :, n:]
    g = past.unflatten(2, (-1, spec.group)).transpose(-1, -2) if keys and spec.axis == "channel" else past
    flat = g.reshape(-1, g.shape[-1])
    s16, m16 = grid(flat, bits)
    deq = dequantized(round_to_grid(flat, s16, m16, bits), s16, m16).reshape(g.shape)
    if keys and spec.axis == "channel":
        deq = deq.transpose(-1, -2).flatten(2, 3)
    return torch.cat([deq.to(x.dtype), recent], dim=2)
