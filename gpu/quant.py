"""The packed low-bit weight format every kernel in `gpu/` runs, and round-to-nearest quantisation into it.

A weight W [N, K] (N outputs, K inputs; an embedding table is [vocab, d]) is cut into groups of
`group_size` consecutive inputs per row. Each group is quantised asymmetrically with min-max:

    scale = (max - min) / (2^bits - 1),   q = clamp(round((w - min) / scale), 0, 2^bits - 1),
    w_hat = q * scale + min

`scale` and `min` are stored as float16 (the "float zero-point" of tinygemm/torchao int4, so no
integer zero is rounded). With `symmetric=True` the grid is the signed one of GPTQ and
compressed-tensors: scale = max|w| / ((2^bits - 1) / 2), q = clamp(round(w / scale), -2^(bits-1),
2^(bits-1) - 1), stored as code q + 2^(bits-1) with min = -2^(bits-1) * scale (exact in float16), so
the same kernels run it and a symmetric integer format holds exactly the same values.

K is padded with zero columns to a multiple of 8 only; when the group
size does not divide it, the last group of each row is shorter (576 inputs in groups of 128 are
four groups of 128 and one of 64), so no storage is spent on a padded group. Padded columns hold
code 0 and meet zero activations in the kernels.

Packing, per group of G values (G = the group's length; byte-planar, so unpacking needs only
shifts and masks on contiguous slices — the same code path in Triton, numba and torch):

* 8 bits: one value per byte;
* 4 bits: byte j holds q[j] (low nibble) and q[j + G/2] (high nibble);
* 2 bits: byte j holds q[j + t*G/4] in bits 2t..2t+1, t = 0..3;
* 3, 5 and 6 bits: the (8·bits)-bit word j holds q[j + t*G/8] in bits bits·t .. bits·t + bits - 1,
  t = 0..7, stored as `bits` byte planes of G/8 bytes (byte p of every word in plane p; 3 bits: the
  low, middle and high byte of 24-bit words).

So a row takes K_pad * bits / 8 bytes plus 4 bytes per group: int4 with groups of 128 costs
4.25 bits per weight, int8 8.25 (a little more where a short last group adds a scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lensbench.errors import LensbenchError

BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUP_SIZE = 128


class QuantError(LensbenchError):
    """A quantisation request that the packed format or its kernels cannot serve."""


def check_spec(bits, group_size, in_features: int | None = None, pad: bool = True) -> int:
    """Validate (bits, group_size) and return the effective group size (-1 means one group per row)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise QuantError(f"bits={bits!r} is not supported; use one of {', '.join(map(str, BITS))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise QuantError(f"group_size={group_size!r} must be a positive multiple of 8, or -1 for one group per row")
    if group_size == -1:
        if in_features is None:
            return -1
        return _ceil_to(in_features, 8)
    if group_size % 8:
        raise QuantError(f"group_size={group_size} must be a multiple of 8 (the 3-bit packing holds 8 values in "
                         f"3 bytes); try {max(8, group_size // 8 * 8)}")
    if in_features is not None and in_features % group_size and not pad:
        raise QuantError(f"group_size={group_size} does not divide in_features={in_features} and padding is off; "
                         f"pass pad=True (a shorter last group) or a group size that divides {in_features}")
    return group_size


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class PackedWeight:
    """A quantised [N, K] weight: packed codes [N, K_pad*bits/8] uint8, scales and mins [N, G] float16."""

    packed: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    bits: int
    group_size: int  # effective (never -1)
    shape: tuple[int, int]  # (N, K) of the original weight

    def numpy_views(self):
        """(packed, scales as uint16 bits, mins as uint16 bits) numpy views for the CPU kernels, made once."""
        views = self.__dict__.get("_np")
        if views is None:
            views = (self.packed.numpy(), self.scales.numpy().view("uint16"), self.mins.numpy().view("uint16"))
            self.__dict__["_np"] = views
        return views

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def k_padded(self) -> int:
        """K rounded up to a multiple of 8: the inputs the codes cover."""
        return _ceil_to(self.shape[1], 8)

    def group_bounds(self) -> list[tuple[int, int]]:
        """(first input, length) of each group; only the last can be shorter than `group_size`."""
        kp, gs = self.k_padded, self.group_size
        return [(g, min(gs, kp - g)) for g in range(0, kp, gs)]

    @property
    def nbytes(self) -> int:
        """Bytes of the three tensors, measured from their storage."""
        return sum(t.untyped_storage().nbytes() for t in (self.packed, self.scales, self.mins))

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.packed.to(device), self.scales.to(device), self.mins.to(device), self.bits,
                            self.group_size, self.shape)

    def __repr__(self) -> str:
        n, k = self.shape
        return f"PackedWeight(int{self.bits}, group {self.group_size}, [{n}, {k}], {self.nbytes / 1e6:.2f} MB)"


@torch.no_grad()
def quantize(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE, pad: bool = True,
             symmetric: bool = False) -> PackedWeight:
    """Round-to-nearest, group-wise quantisation of `weight` [N, K] into the packed format: asymmetric
    min-max by default, the signed symmetric grid with `symmetric=True` (module docstring)."""
    w, gs = checked(weight, bits, group_size, pad)
    n, k = weight.shape
    real = torch.arange(w.shape[1]) < k
    codes, scales, mins = [], [], []
    for g0 in range(0, w.shape[1], gs):  # at most two distinct lengths: full groups and a shorter last one
        wg, rg = w[:, g0:g0 + gs], real[g0:g0 + gs]
        s16, m16 = grid(wg[:, rg], bits, symmetric)
        codes.append(torch.where(rg, round_to_grid(wg, s16, m16, bits, symmetric), 0))
        scales.append(s16)
        mins.append(m16)
    return pack(torch.cat(codes, 1), torch.stack(scales, 1), torch.stack(mins, 1), bits, gs, (n, k))


def checked(weight: torch.Tensor, bits: int, group_size: int, pad: bool = True) -> tuple[torch.Tensor, int]:
    """(the weight in float32, zero-padded to K_pad columns; the effective group size), or QuantError."""
    if weight.dim() != 2:
        raise QuantError(f"only 2-D weights can be quantised, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    gs = check_spec(bits, group_size, k, pad)
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise QuantError(f"the weight holds {bad} NaN/Inf values; quantising it would hide them: fix or reload "
                         f"the model's weights first")
    if w.numel() and w.abs().max() > 65504:
        raise QuantError("the weight has values beyond float16's range (65504), which its scales cannot hold; "
                         "keep this layer in full precision")
    return torch.nn.functional.pad(w, (0, _ceil_to(k, 8) - k)), gs


def grid(wg: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) [N] in float16 of the grid for the values `wg` [N, g] of one group (module docstring)."""
    n = wg.shape[0]
    lo = wg.amin(-1) if wg.shape[1] else torch.zeros(n)
    hi = wg.amax(-1) if wg.shape[1] else torch.zeros(n)
    return _range_grid(lo, hi, bits, symmetric)


def _range_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = (1 << bits) - 1
    if symmetric:
        s16 = (torch.maximum(hi, -lo) / (qmax / 2)).clamp_min(1e-8).to(torch.float16)
        return s16, (-(1 << (bits - 1)) * s16.float()).to(torch.float16)  # exact: a power of two times a float16
    return ((hi - lo) / qmax).clamp_min(1e-8).to(torch.float16), lo.to(torch.float16)


# The factors `clipped_grid` tries besides the min-max range itself: shrunk in steps of 2% down to half of it.
CLIP_FACTORS = tuple(1 - i / 50 for i in range(1, 26))


def clipped_grid(wg: torch.Tensor, bits: int, symmetric: bool = False, importance: torch.Tensor | None = None,
                 factors=CLIP_FACTORS) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of `grid` with each row's range [min, max] scaled by the factor in `factors` that minimises
    Σ_j importance_j (w_j - ŵ_j)² over the group (importance [g], e.g. the diagonal of the layer's Hessian; equal
    weights when None) — clipping the outliers of a group buys resolution for the rest, which matters most at 2-3
    bits. The min-max range (factor 1) is always among the candidates, so on this criterion the result is never
    worse than `grid`'s. The search of the GPTQ reference implementation's quantiser (its `mse` option), with the
    error weighted by H_jj, each column's share of the layer error tr(ΔW H ΔWᵀ) when H is diagonal."""
    if not wg.shape[1]:
        return grid(wg, bits, symmetric)
    wg = wg.float()
    lo, hi = wg.amin(-1), wg.amax(-1)
    weight = torch.ones(wg.shape[1]) if importance is None else importance.float().clamp_min(0)

    def candidate(f: float):
        s, m = _range_grid(lo * f, hi * f, bits, symmetric)
        return s, m, ((dequantized(round_to_grid(wg, s, m, bits, symmetric), s, m) - wg) ** 2) @ weight

    best_s, best_m, best = candidate(1.0)
    for f in factors:
        s, m, err = candidate(f)
        better = err < best
        best_s, best_m, best = torch.where(better, s, best_s), torch.where(better, m, best_m), torch.minimum(err, best)
    return best_s, best_m


def round_to_grid(w: torch.Tensor, s16: torch.Tensor, m16: torch.Tensor, bits: int,
                  symmetric: bool = False) -> torch.Tensor:
    """Codes 0..2^bits-1 (float) of `w` [N, g] on the grid (scale, min) [N]; `dequantized` inverts them. The
    symmetric grid rounds signed, round(w / scale) + 2^(bits-1)."""
    s = s16.float().clamp_min(6e-8)[:, None]
    if symmetric:
        half = 1 << (bits - 1)
        return torch.round(w / s).clamp_(-half, half - 1) + half
    return torch.round((w - m16.float()[:, None]) / s).clamp_(0, (1 << bits) - 1)


def dequantized(codes: torch.Tensor, s16: torch.Tensor, m16: torch.Tensor) -> torch.Tensor:
    """The values codes [N, g] stand for on the grid (scale, min) [N]: code * scale + min."""
    return codes * s16.float()[:, None] + m16.float()[:, None]


def pack(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int, group_size: int,
         shape: tuple[int, int]) -> PackedWeight:
    """A PackedWeight from codes [N, K_pad] (0..2^bits-1; zero in padded columns) and scales, mins [N, G]."""
    n, k = codes.shape
    if k % group_size == 0:  # every group whole: all of them in one call
        packed = pack_planes(codes.to(torch.uint8).reshape(n, k // group_size, group_size), bits).reshape(n, -1)
    else:
        packed = torch.cat([pack_planes(codes[:, g0:g0 + group_size].to(torch.uint8)[:, None, :], bits)[:, 0]
                            for g0 in range(0, k, group_size)], 1)
    return PackedWeight(packed.contiguous(), scales.to(torch.float16).contiguous(),
                        mins.to(torch.float16).contiguous(), bits, group_size, tuple(shape))


def pack_planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, G, length] codes -> [N, G, length*bits/8] bytes in the byte-planar layout of the module docstring."""
    if bits == 8:
        return q
    if bits in (4, 2):
        per = 8 // bits
        parts = q.to(torch.uint8).unflatten(-1, (per, -1))  # part t = q[t*gs/per : (t+1)*gs/per]
        word = parts[..., 0, :].clone()
        for t in range(1, per):  # codes < 2^bits: the shifted parts fill disjoint bits of the byte
            word |= parts[..., t, :] << (bits * t)
        return word
    parts = q.unflatten(-1, (8, -1)).to(torch.int64)  # 3, 5, 6 bits: 8 slices of gs/8
    word = sum(parts[..., t, :] << (bits * t) for t in range(8))
    return torch.cat([(word >> (8 * p)) & 0xFF for p in range(bits)], dim=-1).to(torch.uint8)


def unpack(pw: PackedWeight, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
    """The integer codes [n, K_pad] (uint8) of the chosen rows (all by default)."""
    p = pw.packed if rows is None else pw.packed[rows]
    bits = pw.bits
    if bits == 8:
        return p
    out, off = [], 0
    for _, length in pw.group_bounds():
        nbytes = length * bits // 8
        g = p[:, off:off + nbytes]
        off += nbytes
        if bits in (4, 2):
            per, mask = 8 // bits, (1 << bits) - 1
            out += [(g >> (bits * t)) & mask for t in range(per)]
        else:
            planes = g.to(torch.int64).unflatten(-1, (bits, length // 8))
            word = sum(planes[..., p, :] << (8 * p) for p in range(bits))
            mask = (1 << bits) - 1
            out += [((word >> (bits * t)) & mask).to(torch.uint8) for t in range(8)]
    return torch.cat(out, dim=-1)
