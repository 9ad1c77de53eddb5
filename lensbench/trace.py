"""`Trace`: activations captured at canonical sites for one batch. Holds no reference to the model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import parse_site_name, site_name
from .numeric import storage_bytes

POSITIONS = ("all", "last", "mean")


@dataclass
class Trace:
    """Activations keyed by TransformerLens-style names (`blocks.3.hook_resid_post`).

    With positions="all" each tensor is [batch, seq, d_model] (padding included, see the masks);
    with "last" (last real token) or "mean" (mean over real tokens) it is [batch, d_model].
    """

    activations: dict[str, torch.Tensor]
    positions: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    content_mask: torch.Tensor  # real, non-special tokens
    model: dict = field(default_factory=dict)  # name and fingerprint of the model it came from

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.activations[name]
        except KeyError:
            raise KeyError(f"{name!r} was not captured; captured sites: {', '.join(self.sites)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.activations

    def keys(self):
        return self.activations.keys()

    @property
    def layers(self) -> list[int]:
        return sorted({parse_site_name(k)[0] for k in self.activations})

    @property
    def sites(self) -> list[str]:
        seen: dict[str, None] = {}
        for k in self.activations:
            seen[parse_site_name(k)[1]] = None
        return list(seen)

    @property
    def nbytes(self) -> int:
        """Bytes held, counting shared storage once (resid_pre of block i+1 is resid_post of block i)."""
        return storage_bytes(self.activations.values())

    def stack(self, site: str, layers: list[int] | None = None) -> torch.Tensor:
        """All layers of one site stacked on a new leading axis."""
        layers = self.layers if layers is None else layers
        return torch.stack([self[site_name(i, site)] for i in layers])

    def tokens(self, name: str, mask: str = "content") -> torch.Tensor:
        """[n_tokens, d_model]: the tokens of one site selected by `mask` ("content" or "attention")."""
        if self.positions != "all":
            raise ValueError(f"tokens() needs positions='all'; this trace holds positions={self.positions!r}")
        m = self.content_mask if mask == "content" else self.attention_mask.bool()
        return self[name][m]

    def __repr__(self) -> str:
        return (f"Trace({len(self.activations)} tensors, sites={self.sites}, layers=0..{max(self.layers, default=-1)}, "
                f"positions={self.positions!r}, {self.nbytes / 2**20:.1f} MiB)")
