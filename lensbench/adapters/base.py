"""Architecture adapters: where each canonical site lives in a family's modules, and per-head weights.

An adapter is registered by Hugging Face class name (`@register("LlamaForCausalLM", ...)`). It
describes a block as a handful of module paths; everything else (hook points, per-head weight
views, the unembedding) is derived here once, so a new family is a small declarative subclass.

Canonical sites per block i (TransformerLens names, `blocks.{i}.` prefix):

    hook_resid_pre   input of block i
    hook_attn_out    what the attention sublayer adds to the residual
    hook_resid_mid   residual after attention (pre-norm: resid_pre + attn_out; post-norm: LN of that;
                     parallel-residual blocks: resid_pre + attn_out, computed, since the model never
                     forms it)
    hook_mlp_out     what the MLP sublayer adds
    hook_resid_post  output of block i
    ln1.hook_normalized, ln2.hook_normalized   the normalised sublayer inputs (optional taps)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ..errors import UnknownArchitectureError

SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
NORM_SITES = ("ln1.hook_normalized", "ln2.hook_normalized")
ALL_SITES = SITES + NORM_SITES


def site_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.{site}"


def parse_site_name(name: str) -> tuple[int, str]:
    """`blocks.3.hook_resid_post` -> (3, 'hook_resid_post')."""
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in ALL_SITES:
        raise ValueError(f"not a canonical site name: {name!r} (expected blocks.<i>.<{'|'.join(ALL_SITES)}>)")
    return int(parts[1]), parts[2]


@dataclass(frozen=True)
class Tap:
    """A tensor read at a module boundary: its first positional input, or its output (first item of a tuple)."""

    module: str  # path relative to the block
    io: str  # "input" | "output"


@dataclass(frozen=True)
class Sum:
    """A site the model never materialises, computed as the sum of other taps."""

    parts: tuple[Tap, ...]


@dataclass
class HeadWeights:
    """Per-head attention weights of one layer, in `x @ W` orientation.

    W_Q: [n_heads, d_model, d_head]; W_K, W_V: [n_kv_heads, d_model, d_head]; W_O: [n_heads, d_head, d_model].
    Query head h reads key/value head `h // (n_heads // n_kv_heads)` (grouped-query attention).
    Rotary position embeddings, where the family uses them, act after W_Q / W_K and are not folded in.
    """

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_Q: torch.Tensor | None = None
    b_K: torch.Tensor | None = None
    b_V: torch.Tensor | None = None
    b_O: torch.Tensor | None = None

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.W_K.shape[0]

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv_heads)

    def expand_kv(self) -> "HeadWeights":
        """Repeat key/value heads so every tensor is indexed by query head."""
        rep = self.n_heads // self.n_kv_heads

        def ex(t):
            return None if t is None else t.repeat_interleave(rep, dim=0)

        return HeadWeights(self.W_Q, ex(self.W_K), ex(self.W_V), self.W_O,
                           self.b_Q, ex(self.b_K), ex(self.b_V), self.b_O)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class Adapter:
    """Maps canonical sites of one architecture family to modules. Subclasses set the class attributes."""

    family: ClassVar[str] = "?"
    is_causal_lm: ClassVar[bool] = True
    layers: ClassVar[str]  # ModuleList path relative to the base model
    attn: ClassVar[str]  # attention module, relative to a block
    mlp: ClassVar[str] = "mlp"  # MLP module, relative to a block
    sublayer_drop: ClassVar[bool] = True  # attention/MLP can be removed alone (pre-norm or parallel blocks)
    out_proj: ClassVar[str | None] = None  # attention output projection (W_O), relative to a block
    ln1: ClassVar[str | None]  # norm before attention (None for post-norm)
    ln2: ClassVar[str | None]  # norm before the MLP (None when attention and MLP share ln1)
    attn_out: ClassVar[Tap]  # what attention adds to the residual
    mlp_out: ClassVar[Tap]  # what the MLP adds to the residual
    resid_mid: ClassVar[Tap | None]  # None: computed as resid_pre + attn_out
    final_norm: ClassVar[str | None] = None  # relative to the base model

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        prefix = getattr(model, "base_model_prefix", "")
        self.base = getattr(model, prefix, None) if prefix else None
        if not isinstance(self.base, nn.Module):
            self.base = model  # the bare base model was handed in

    @property
    def lm_head(self) -> nn.Module | None:
        """The output projection; None for encoders and bare base models. Looked up on every use, so it is the
        module a plan swapped in (`apply`, `convert`), never a stale one."""
        if not self.is_causal_lm or not hasattr(self.model, "get_output_embeddings"):
            return None
        return self.model.get_output_embeddings()

    @property
    def has_lm_head(self) -> bool:
        return self.lm_head is not None

    # --- structure -------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return _get(self.base, self.layers)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def d_head(self) -> int:
        return getattr(self.config, "head_dim", None) or self.d_model // self.n_heads

    @property
    def max_context(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)

    def block_path(self, layer: int) -> str:
        """Dotted path of block `layer` relative to the top model (for Plans and hooks)."""
        base_prefix = "" if self.base is self.model else self.model.base_model_prefix + "."
        return f"{base_prefix}{self.layers}.{layer}"

    def unit_path(self, layer: int, kind: str) -> str:
        """Dotted path (from the top model) of a removable unit: kind "block", "attn" or "mlp"."""
        block = self.block_path(layer)
        return {"block": block, "attn": f"{block}.{self.attn}", "mlp": f"{block}.{self.mlp}"}[kind]

    def site(self, layer: int, site: str) -> Tap | Sum:
        """Where canonical `site` of block `layer` is read, relative to that block."""
        if site == "hook_resid_pre":
            return Tap("", "input")
        if site == "hook_resid_post":
            return Tap("", "output")
        if site == "hook_attn_out":
            return self.attn_out
        if site == "hook_mlp_out":
            return self.mlp_out
        if site == "hook_resid_mid":
            return self.resid_mid or Sum((Tap("", "input"), self.attn_out))
        if site == "ln1.hook_normalized":
            return Tap(self.ln1, "output") if self.ln1 else Tap("", "input")
        if site == "ln2.hook_normalized":
            if self.ln2:
                return Tap(self.ln2, "output")
            return self.site(layer, "ln1.hook_normalized" if self.ln1 else "hook_resid_mid")
        raise ValueError(f"unknown site {site!r}; known: {', '.join(ALL_SITES)}")

    def module_at(self, layer: int, tap: Tap) -> nn.Module:
        return _get(self.blocks[layer], tap.module)

    # --- weights ---------------------------------------------------------------------------
    def head_weights(self, layer: int) -> HeadWeights:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not expose per-head weights")

    def head_out_weight(self, layer: int, head: int) -> torch.Tensor:
        """A writable view of head `head`'s W_O [d_head, d_model] inside the model's own parameter."""
        if self.out_proj is None:
            raise NotImplementedError(f"{type(self).__name__} does not name its attention output projection")
        proj = self.blocks[layer].get_submodule(self.out_proj)
        cols = slice(head * self.d_head, (head + 1) * self.d_head)
        if type(proj).__name__ == "Conv1D":  # GPT-2 stores [in, out]
            return proj.weight.data[cols]
        return proj.weight.data[:, cols].T

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream state: final norm then the LM head (the logit lens)."""
        if not self.has_lm_head:
            raise ValueError(f"{type(self.model).__name__} has no LM head to unembed with")
        return self.head(self.final_normed(resid))

    def final_normed(self, resid: torch.Tensor) -> torch.Tensor:
        return _get(self.base, self.final_norm)(resid) if self.final_norm else resid

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits from the final-normed state (what the base model returns as its last hidden state)."""
        return self.lm_head(normed)

    def head_modules(self) -> list[nn.Module]:
        """The modules `final_normed` and `head` run (held in memory together while a layer-by-layer model
        scores against the vocabulary)."""
        norm = [_get(self.base, self.final_norm)] if self.final_norm else []
        return norm + ([self.lm_head] if self.lm_head is not None else [])

    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W [vocab, d], bias) when the logits are exactly `normed @ W.T + bias`, else None."""
        if isinstance(self.lm_head, nn.Linear):
            return self.lm_head.weight, self.lm_head.bias
        return None

    # --- helpers for subclasses ----------------------------------------------------------
    def _from_linears(self, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module) -> HeadWeights:
        """Per-head weights from separate q/k/v/o nn.Linear projections (most families)."""
        H, K = self.n_heads, self.n_kv_heads
        return HeadWeights(
            W_Q=self._split_heads_in(q.weight, H), W_K=self._split_heads_in(k.weight, K),
            W_V=self._split_heads_in(v.weight, K), W_O=self._split_heads_out(o.weight),
            b_Q=self._bias(q, H), b_K=self._bias(k, K), b_V=self._bias(v, K), b_O=self._bias(o),
        )

    def _split_heads_in(self, weight: torch.Tensor, n: int) -> torch.Tensor:
        """nn.Linear weight [n*d_head, d_model] -> [n, d_model, d_head]."""
        return weight.detach().reshape(n, self.d_head, -1).transpose(1, 2)

    def _split_heads_out(self, weight: torch.Tensor) -> torch.Tensor:
        """nn.Linear weight [d_model, n_heads*d_head] -> [n_heads, d_head, d_model]."""
        return weight.detach().T.reshape(self.n_heads, self.d_head, -1)

    def _bias(self, lin: nn.Module, n: int | None = None) -> torch.Tensor | None:
        b = getattr(lin, "bias", None)
        if b is None:
            return None
        b = b.detach()
        return b.reshape(n, self.d_head) if n else b


_REGISTRY: dict[str, type[Adapter]] = {}


def register(*class_names: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Register an adapter for the given Hugging Face model class names."""

    def deco(cls: type[Adapter]) -> type[Adapter]:
        for name in class_names:
            _REGISTRY[name] = cls
        return cls

    return deco


def registered() -> dict[str, type[Adapter]]:
    return dict(sorted(_REGISTRY.items()))


def adapter_for(model: nn.Module) -> Adapter:
    name = type(model).__name__
    cls = _REGISTRY.get(name)
    if cls is None:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise UnknownArchitectureError(
            f"no lensbench adapter for model class {name!r} (model_type {model_type!r}); register one with "
            f"@lensbench.adapters.register({name!r}) on an Adapter subclass (see lensbench/adapters/llama.py)"
        )
    return cls(model)
