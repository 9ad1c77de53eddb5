"""lensbench's CPU attention for decode steps, as a transformers attention implementation (`NAME`).

At one query token transformers' eager attention is a matmul over every position of a static cache, a masked
softmax and a second matmul; the native op (`gpu/native/attention.cpp`) reads only the positions the mask keeps
(a cache of 1024 positions holding 200 tokens costs 200 dot products per head), with the scores, softmax and
weighted sum of the values in one pass per head, in float32. It runs where the native library is loaded
(`gpu.cpu_native.attention_ready()`, once `library_available()` has built it), on float32 CPU tensors with
heads of at most 256 and a boolean mask; anything else (other dtypes or devices, dropout while training, logit
soft-capping, attention sinks) runs transformers' SDPA attention. Its masks are SDPA's boolean ones, never skipped for
`is_causal` (the op attends to every position it is not told to drop).

    with decoding.attention(module, NAME): ...   # what Decoder(step_attention="native") does around its steps
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .gpu import cpu_native

NAME = "lensbench_native"


def _mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False  # without a mask the op would attend to every position
    return sdpa_mask(*args, **kwargs)


def native_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs):
    """transformers' attention signature: query [B, H, Q, D], key and value [B, Hkv, L, D] -> ([B, Q, H, D], None)."""
    runs = (cpu_native.attention_ready() and query.device.type == "cpu"
            and query.dtype == key.dtype == value.dtype == torch.float32 and query.shape[-1] <= 256
            and not (dropout and module.training) and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None and kwargs.get("sinks") is None
            and (attention_mask is None or attention_mask.dtype == torch.bool))
    if not runs:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.lensbench_native.decode_attention(query, key, value, attention_mask, scale), None


AttentionInterface.register(NAME, native_attention)
AttentionMaskInterface.register(NAME, _mask)
