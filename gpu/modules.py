"""Modules that hold packed weights and run them through `gpu.dispatch`: they replace nn.Linear and
nn.Embedding when a Plan quantises them. A tied LM head shares its table with the embedding (the
same buffers), so the bytes are held once."""
from __future__ import annotations

import torch
from torch import nn

from . import compiled, dispatch, fusion
from .mixed import MixedWeight
from .quant import PackedWeight, QuantError, quantize
from .reference import dequantize


class PackedModule(nn.Module):
    def __init__(self, pw: PackedWeight):
        super().__init__()
        self.register_buffer("packed", pw.packed)
        self.register_buffer("scales", pw.scales)
        self.register_buffer("mins", pw.mins)
        self.bits, self.group_size, self.shape = pw.bits, pw.group_size, pw.shape
        self.__dict__["_pw"] = pw  # the same object apply's cache holds, with what kernels derived from it

    @property
    def pw(self) -> PackedWeight:
        pw = self.__dict__.get("_pw")
        if pw is None or pw.packed is not self.packed or pw.scales is not self.scales:  # e.g. after .to(device)
            pw = PackedWeight(self.packed, self.scales, self.mins, self.bits, self.group_size, self.shape)
            self.__dict__["_pw"] = pw
        return pw


def make_lean(root: nn.Module) -> None:
    """Keep every packed weight under `root` off torch's weight-only kernels, whose own copy of the codes would sit
    beside the packed bytes: decode then runs the exact numba kernels (less memory, slower)."""
    for module in root.modules():
        if isinstance(module, PackedModule):
            module.pw.__dict__["lean"] = True


class QuantLinear(PackedModule):
    """y = x @ W_hat.T + b with W_hat packed (int2/3/4/5/6/8, group-wise scales and mins)."""

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__(pw)
        self.out_features, self.in_features = pw.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, shared: PackedWeight | None = None):
        pw = shared if shared is not None else quantize(linear.weight, bits, group_size).to(linear.weight.device)
        return cls(pw, linear.bias, linear.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the quantised weight, for code that reads `.weight` (the forward never does)."""
        return dequantize(self.pw, dtype=self.dtype).to(self.packed.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and compiled.prepared(self):  # a compiled decode step
            return compiled.linear(self, x, self.bias)
        if dispatch.CPU_KERNELS and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            fuser = self.__dict__.get("fuser")  # set by `fusion.install`: one call for linears sharing x
            if fuser is not None and x.numel() <= fusion.MAX_ROWS * x.shape[-1]:
                y = fuser.run(self, x, dispatch.cpu_matmul)
                if y is not None:
                    if self.bias is not None:
                        y.add_(self.bias)
                    return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return dispatch.cpu_matmul(x, self.pw, self.bias)  # the common case, without the dispatch checks
        return dispatch.matmul(x, self.pw, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class QuantEmbedding(PackedModule):
    """An nn.Embedding whose table is packed; a lookup dequantises only the rows it reads."""

    def __init__(self, pw: PackedWeight, dtype: torch.dtype):
        super().__init__(pw)
        self.num_embeddings, self.embedding_dim = pw.shape
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int, name: str = "embedding"):
        cls.check(emb, name)
        return cls(quantize(emb.weight, bits, group_size).to(emb.weight.device), emb.weight.dtype)

    @staticmethod
    def check(emb: nn.Module, name: str = "embedding") -> None:
        """Refuse tables whose lookup the packed kernels cannot reproduce."""
        if type(emb) is not nn.Embedding:
            raise QuantError(f"{name} is a {type(emb).__name__}, which changes the lookup (e.g. scales it); the "
                             f"packed kernels run only plain nn.Embedding tables: leave {name} out of the plan")
        if emb.max_norm is not None:
            raise QuantError(f"{name} renormalises rows (max_norm={emb.max_norm}), which the packed lookup cannot "
                             f"do: leave it out of the plan")

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.pw, dtype=self.dtype).to(self.packed.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and compiled.prepared(self):
            return compiled.rows(self, ids)
        return dispatch.embedding(ids, self.pw, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}, group_size={self.group_size}"


class MixedQuantLinear(nn.Module):
    """A QuantLinear whose input groups have different widths (`gpu.mixed.MixedWeight`, BAQ's allocation): one
    packed matmul per width on its input columns, summed."""

    def __init__(self, mw: MixedWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.parts = nn.ModuleList(_Part(cols, pw) for cols, pw in mw.parts)
        self.group_bits, self.group_size = mw.group_bits, mw.group_size
        self.out_features, self.in_features = mw.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.dtype = dtype

    @property
    def mw(self) -> MixedWeight:
        return MixedWeight([(p.cols, p.pw) for p in self.parts], self.group_bits, self.group_size,
                           (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the quantised weight, for code that reads `.weight` (the forward never does)."""
        return self.mw.dequantize(self.dtype).to(self.parts[0].packed.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for part in self.parts:
            xs = x.index_select(-1, part.cols)
            if torch.compiler.is_compiling() and compiled.prepared(part):
                out = compiled.linear(part, xs)
            else:
                out = dispatch.matmul(xs, part.pw, None)
            y = out if y is None else y.add_(out)
        return y if self.bias is None else y.add_(self.bias.to(y.dtype))

    def extra_repr(self) -> str:
        widths = ", ".join(f"int{p.bits} x {len(p.cols)}" for p in self.parts)
        return (f"in_features={self.in_features}, out_features={self.out_features}, {widths} inputs, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class _Part(PackedModule):
    """One width's columns of a MixedQuantLinear."""

    def __init__(self, cols: torch.Tensor, pw: PackedWeight):
        super().__init__(pw)
        self.register_buffer("cols", cols)
