"""`Model`: a loaded torch model, its tokenizer, its adapter and where it came from."""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .adapters import Adapter
from .errors import LensbenchError
from .offload import resident


@dataclass
class Batch:
    """Tokenised text: ids, attention mask and the mask of tokens that statistics should count."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    content_mask: torch.Tensor  # [B, T] bool: real, non-special tokens (no BOS/CLS/SEP/pad)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def next_tokens(self) -> torch.Tensor:
        """[B, T] the token after each position (the next-token target), -1 where the text ends."""
        nxt = torch.full_like(self.input_ids, -1)
        nxt[:, :-1] = torch.where(self.attention_mask[:, 1:].bool(), self.input_ids[:, 1:], -1)
        return nxt


@dataclass
class Model:
    """A loaded model. `card` is the provenance that Profiles and Plans carry."""

    module: nn.Module
    tokenizer: Any
    adapter: Adapter
    card: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.card.get("name", type(self.module).__name__)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    @property
    def is_causal_lm(self) -> bool:
        return self.adapter.has_lm_head

    @property
    def max_context(self) -> int | None:
        return self.adapter.max_context

    def fingerprint(self) -> str:
        """Identity used to match Profiles and Plans to models (see `weights_fingerprint`)."""
        if "fingerprint" not in self.card:
            self.card["fingerprint"] = weights_fingerprint(self.module)
        return self.card["fingerprint"]

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> Batch:
        """Tokenise and right-pad `texts`.

        With `max_length=None` a text longer than the model's context is an error (nothing is cut
        silently); with `max_length` each text is truncated to that many tokens.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise LensbenchError("no texts to tokenise: give at least one non-empty text")
        ctx = self.max_context
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=max_length is not None,
                  max_length=max_length, return_special_tokens_mask=True)
        lengths = enc["attention_mask"].sum(1)
        if ctx is not None and int(lengths.max()) > ctx:
            i = int(lengths.argmax())
            raise LensbenchError(
                f"text {i} has {int(lengths[i])} tokens, longer than the model's context of {ctx}; "
                f"truncate it with max_length= (CLI: --seq-len)"
            )
        mask = enc["attention_mask"].bool()
        content = mask & ~enc["special_tokens_mask"].bool()
        return Batch(enc["input_ids"], enc["attention_mask"], content)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        return (f"Model({self.name!r}, {type(self.module).__name__}, {self.n_layers} layers, "
                f"d_model={self.d_model}, {n / 1e6:.1f}M params)")


def canonical_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters a freshly built model of this class has, by their Hugging Face names.

    Wrappers can add tensors (TransformerLens's bridge splits fused q/k/v into new ones); the names
    come from a skeleton built on the meta device (no memory), so only the model's own weights count.
    A weight its module holds in another form (a packed module's codes, scales and mins) is stood for
    by that module's own tensors, never by a dense copy made to read it.
    """
    try:
        with torch.device("meta"):
            skeleton = type(module)(module.config)
        out = []
        for name, _ in skeleton.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if isinstance(getattr(type(owner), leaf, None), property):  # computed on reading: a packed module's
                out += [(f"{owner_name}.{b}" if owner_name else b, t) for b, t in owner.named_buffers(recurse=False)]
            else:
                out.append((name, module.get_parameter(name)))
        return out
    except Exception:  # not constructible from its config: take the parameters as they are
        return list(module.named_parameters())


def weights_fingerprint(module: nn.Module, samples: int = 4096) -> str:
    """Identity of a model's weights, the same whichever way it was loaded or wrapped.

    sha256 over every canonical parameter's name, shape, dtype and up to `samples` evenly strided
    values: cheap for any model size, while any real change of weights (fine-tuning, another
    checkpoint, quantisation) changes it.
    """
    h = hashlib.sha256()
    for name, p in canonical_parameters(module):
        # a layer-by-layer model's weight is read in for this (buffers, such as packed codes, stay in memory)
        with resident(p) if isinstance(p, nn.Parameter) else contextlib.nullcontext():
            flat = p.detach().reshape(-1)
            if flat.numel() > samples:
                flat = flat[:: flat.numel() // samples][:samples]
            flat = flat.clone()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def describe(module: nn.Module) -> dict:
    cfg = module.config
    return {
        "class": type(module).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "n_params": int(sum(p.numel() for p in module.parameters())),
        "dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
    }
