"""llama.cpp's GGML block formats: which type a bit-width becomes, and quantisation into it.

`gguf` (the package) quantises F16/BF16/Q8_0/Q5_0/Q5_1/Q4_0/Q4_1 and only *dequantises* the
K-quants; the K-quant quantisers Q6_K, Q5_K, Q4_K, Q3_K and Q2_K are written here (numpy, vectorised
over super-blocks), byte for byte in the layout `gguf.quants.dequantize` reads, and tested against it.
They are plain round-to-nearest with quantised sub-block scales (8-bit Q6_K, 6-bit Q3_K/Q4_K/Q5_K,
4-bit Q2_K); llama.cpp's own reference searches a few scales per sub-block, so its error can be lower.

Every type, the 32-value ones included, is also split into its three steps: `fit` (the grid: the stored
scales, and per run of values the scale and low end a reader computes with), `Grid.codes` (rounding onto it)
and `Grid.pack` (the bytes). GPTQ (`lensbench.compress.gptq`) fits the grid once and rounds its updated columns
onto it, so a GGUF file can hold GPTQ's rounding; `GGMLWeight` carries such bytes to the writer.

Which type a bit-width becomes (`ggml_type`): 8 -> Q8_0, 6 -> Q6_K, 5 -> Q5_K, 4 -> Q4_K, 3 -> Q3_K,
2 -> Q2_K. K-quants pack rows in super-blocks of 256 values; a row whose length is not a multiple of
256 (SmolLM2's 576) falls back, explicitly, to the 32-value type of at least the same bits per weight:
Q6_K -> Q8_0, Q5_K -> Q5_0, Q4_K/Q3_K/Q2_K -> Q4_0 (there is no 32-value type below 4 bits).
`bits_per_weight` gives the real cost of each type, so a file's reported bits are what it holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .quant import QuantError
from gguf import GGMLQuantizationType
from gguf import GGML_QUANT_SIZES
from gguf import quants

GGUF_BITS = (2, 3, 4, 5, 6, 8)
K_TYPE = {8: "Q8_0", 6: "Q6_K", 5: "Q5_K", 4: "Q4_K", 3: "Q3_K", 2: "Q2_K"}
FALLBACK = {"Q6_K": "Q8_0", "Q5_K": "Q5_0", "Q4_K": "Q4_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0", "Q8_0": "Q8_0"}
QK_K = 256


class GGMLError(QuantError):
    """A request the GGML formats cannot serve."""


def ggml_type(bits: int, row_length: int) -> str:
    """The GGML type name a weight row of `row_length` values quantised at `bits` is stored as."""
    if bits not in K_TYPE:
        raise GGMLError(f"{bits} bits have no GGUF type here; use one of {', '.join(map(str, GGUF_BITS))} "
                        f"(Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0)")
    t = K_TYPE[bits]
    if t.endswith("_K") and row_length % QK_K:
        t = FALLBACK[t]
    if row_length % 32:
        raise GGMLError(f"a row of {row_length} values fits no GGUF block type (rows must be multiples of 32); "
                        f"keep this tensor in float16")
    return t


def _qtype(name: str):

    return GGMLQuantizationType[name]


def bits_per_weight(name: str) -> float:
    """Bits per weight of a GGML type, from the block size and bytes that `gguf` declares."""

    block, nbytes = GGML_QUANT_SIZES[_qtype(name)]
    return 8 * nbytes / block


def _checked(w: np.ndarray) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise GGMLError("the weight holds NaN/Inf values; quantising it would hide them")
    return w


def quantize(w: np.ndarray, name: str) -> np.ndarray:
    """`w` [N, K] float32 -> the raw GGML bytes [N, K / block * bytes] of type `name`: the 32-value types by
    `gguf`'s quantiser (llama.cpp's reference rounding, byte for byte), the K-quants by `fit` here."""
    if name.endswith("_K"):
        grid = fit(w, name)  # checks `w`
        return grid.pack(grid.codes(np.asarray(w, dtype=np.float32)))
    return quants.quantize(_checked(w), _qtype(name))


def dequantize(data: np.ndarray, name: str) -> np.ndarray:
    """Raw GGML bytes of type `name` -> float32 values, with `gguf`'s own dequantiser."""

    return quants.dequantize(data, _qtype(name)).astype(np.float32, copy=False)


def roundtrip(w: np.ndarray, name: str) -> np.ndarray:
    """What a GGUF reader computes with: `w` quantised to `name` and read back."""
    return dequantize(quantize(w, name), name)


# --- grids: each type's scales fitted to the values, codes rounded onto them, and the bytes packed ---------------
@dataclass(frozen=True)
class Grid:
    """A weight [N, K] in GGML type `qtype`: value = scale * code + low for each run of `sub` values along a row,
    codes 0..qmax (a signed type's codes are offset to start at 0). `fields` are what the type stores per block
    (float16 block scales, sub-block scale codes), in the order its packer takes them. Rounding onto a grid
    fitted to other values (GPTQ's updated columns) is what llama.cpp's own quantiser cannot do."""

    qtype: str
    sub: int
    qmax: int
    scale: np.ndarray  # [N, K // sub] float32: the scale a reader multiplies each code with
    low: np.ndarray  # [N, K // sub] float32: the value of code 0
    fields: tuple

    def codes(self, w: np.ndarray) -> np.ndarray:
        """Codes [N, K] uint8 of `w` rounded to nearest on this grid."""
        n, k = w.shape
        x = w.reshape(n, k // self.sub, self.sub)
        return self._round(x, self.scale[..., None], self.low[..., None]).reshape(n, k)

    def column(self, col: int, values: np.ndarray) -> np.ndarray:
        """Codes [N] uint8 of input column `col`'s values [N] (GPTQ's updated column) rounded on this grid."""
        return self._round(values, self.scale[:, col // self.sub], self.low[:, col // self.sub])

    def _round(self, x: np.ndarray, scale: np.ndarray, low: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(_safe_div(x - low, scale)), 0, self.qmax).astype(np.uint8)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """The raw GGML bytes [N, row bytes] of `codes` [N, K] on this grid."""
        n, k = codes.shape
        block, _, _, _, packer = _TYPES[self.qtype]
        return packer(self.fields, codes.reshape(-1, block).astype(np.uint8)).reshape(n, -1)


def fit(w: np.ndarray, name: str) -> Grid:
    """The grid type `name`'s quantiser fits to `w` [N, K] (K a multiple of its block)."""
    w = _checked(w)
    n, k = w.shape
    block, sub, qmax, fitter, _ = _TYPES[name]
    if k % block:
        raise GGMLError(f"{name} needs rows that are multiples of {block} values, got {k}")
    scale, low, fields = fitter(w.reshape(-1, block))
    return Grid(name, sub, qmax, scale.reshape(n, -1).astype(np.float32), low.reshape(n, -1).astype(np.float32),
                fields)


@dataclass(frozen=True)
class GGMLWeight:
    """A weight [N, K] stored as GGML type `qtype`: the bytes [N, row bytes] a GGUF file holds for it."""

    qtype: str
    data: np.ndarray
    shape: tuple[int, int]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The values a GGUF reader computes with."""
        return torch.from_numpy(dequantize(self.data, self.qtype).reshape(self.shape)).to(dtype)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _f32(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float32)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _bytes(d: np.ndarray) -> np.ndarray:
    """float16 [nb] or [nb, 1] -> its 2 bytes per block."""
    return d.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _signed_extreme(x: np.ndarray) -> np.ndarray:
    """Each row's value of largest magnitude, with its sign."""
    return np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]


# the 32-value types: one float16 scale (and min) per block
def _fit_sym(half: int):
    def fitter(x):
        d = _f16(_signed_extreme(x) / -half)  # the extreme maps to code 0 exactly
        return _f32(d)[:, None], -half * _f32(d)[:, None], (d,)
    return fitter


def _fit_asym(qmax: int):
    def fitter(x):
        lo = x.min(-1)
        d, m = _f16((x.max(-1) - lo) / qmax), _f16(lo)
        return _f32(d)[:, None], _f32(m)[:, None], (d, m)
    return fitter


def _fit_q8_0(x):
    d = _f16(np.abs(x).max(-1) / 127)
    return _f32(d)[:, None], -128 * _f32(d)[:, None], (d,)  # int8 codes -128..127, offset to 0..255


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """q [nb, 32] -> 16 bytes: byte i holds value i (low nibble) and value 16 + i (high)."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes -> 4 bytes, value i in bit i (little-endian)."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _pack_q4_0(f, q):
    return np.concatenate([_bytes(f[0]), _low_nibbles(q)], 1)


def _pack_q4_1(f, q):
    return np.concatenate([_bytes(f[0]), _bytes(f[1]), _low_nibbles(q)], 1)


def _pack_q5_0(f, q):
    return np.concatenate([_bytes(f[0]), _high_bits(q), _low_nibbles(q)], 1)


def _pack_q5_1(f, q):
    return np.concatenate([_bytes(f[0]), _bytes(f[1]), _high_bits(q), _low_nibbles(q)], 1)


def _pack_q8_0(f, q):
    return np.concatenate([_bytes(f[0]), (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], 1)


# the K-quants: super-blocks of 256 values, sub-block scales quantised against float16 super-block scales
def _scale_min(x: np.ndarray, qmax: int, smax: int):
    """Asymmetric sub-block grids of Q2_K/Q4_K/Q5_K: x [nb, sub-blocks, values] -> (scale, low [nb, sub-blocks],
    fields (d, dmin [nb] float16, sc, m [nb, sub-blocks] codes in 0..smax)) with x ~ d*sc*q - dmin*m."""
    lo = np.minimum(x.min(-1), 0.0)  # the format's minimum is subtracted, so it is <= 0
    scale = (x.max(-1) - lo) / qmax
    mins = -lo
    d = _f16(scale.max(-1) / smax)
    dmin = _f16(mins.max(-1) / smax)
    sc = np.clip(np.rint(_safe_div(scale, _f32(d)[:, None])), 0, smax).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(mins, _f32(dmin)[:, None])), 0, smax).astype(np.uint8)
    return _f32(d)[:, None] * sc, -(_f32(dmin)[:, None] * m), (d, dmin, sc, m)


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12 bytes of Q4_K/Q5_K (the layout gguf's get_scale_min reads)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q [nb, 256] (low 4 bits used) -> 128 bytes: byte 32j+i holds sub-block 2j (low) and 2j+1 (high)."""
    q = q.reshape(q.shape[0], 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _fit_q4_k(x):
    return _scale_min(x.reshape(-1, 8, 32), 15, 63)


def _pack_q4_k(f, q):
    d, dmin, sc, m = f
    return np.concatenate([_bytes(d), _bytes(dmin), _pack_scale_min(sc, m), _nibbles(q)], 1)


def _fit_q5_k(x):
    return _scale_min(x.reshape(-1, 8, 32), 31, 63)


def _pack_q5_k(f, q):
    d, dmin, sc, m = f
    high = ((q >> 4) & 1).reshape(-1, 8, 32)  # bit k of byte i is the high bit of value i of sub-block k
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for k in range(8):
        qh |= high[:, k] << k
    return np.concatenate([_bytes(d), _bytes(dmin), _pack_scale_min(sc, m), qh, _nibbles(q)], 1)


def _fit_q6_k(x):
    scale = np.abs(x.reshape(-1, 16, 16)).max(-1) / 31  # signed 6-bit codes -32..31
    d = _f16(scale.max(-1) / 127)
    sc = np.clip(np.rint(_safe_div(scale, _f32(d)[:, None])), 0, 127).astype(np.int8)
    eff = _f32(d)[:, None] * sc
    return eff, -32 * eff, (d, sc)


def _pack_q6_k(f, q):
    d, sc = f
    nb = q.shape[0]
    q = q.reshape(nb, 2, 128)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(nb, 128)
    h = high.reshape(nb, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _bytes(d)], 1)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """q [nb, 256] 2-bit codes -> 64 bytes: byte 32h+i holds value 128h + 32s + i in bits 2s..2s+1."""
    q = q.reshape(q.shape[0], 2, 4, 32) & 0x03
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(q.shape[0], 64)


def _fit_q2_k(x):
    return _scale_min(x.reshape(-1, 16, 16), 3, 15)


def _pack_q2_k(f, q):
    d, dmin, sc, m = f
    return np.concatenate([sc | (m << 4), _crumbs(q), _bytes(d), _bytes(dmin)], 1)


def _fit_q3_k(x):
    # signed 3-bit codes -4..3: the sub-block's largest-magnitude value maps to -4 exactly (its scale may be
    # negative), so the asymmetric grid loses nothing at the extreme
    scale = -_signed_extreme(x.reshape(-1, 16, 16)) / 4
    d = _f16(np.abs(scale).max(-1) / 31)
    sc = np.clip(np.rint(_safe_div(scale, _f32(d)[:, None])), -32, 31).astype(np.int16)
    eff = _f32(d)[:, None] * sc
    return eff, -4 * eff, (d, sc)


def _pack_q3_k(f, q):
    d, sc = f
    nb = q.shape[0]
    high = (q >> 2).reshape(nb, 8, 32)  # bit s of byte i: value 32s + i is >= 0
    hmask = np.zeros((nb, 32), np.uint8)
    for s in range(8):
        hmask |= high[:, s] << s
    s6 = (sc + 32).astype(np.uint8)  # 6-bit codes, offset by 32
    low, top = s6 & 0x0F, s6 >> 4
    scales = np.concatenate([low[:, :8] | (low[:, 8:] << 4),
                             top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)], axis=1)
    return np.concatenate([hmask, _crumbs(q), scales, _bytes(d)], 1)


# reading the 32-value types back: the codes and the grid a file's bytes hold
def _halves(b: np.ndarray) -> np.ndarray:
    """[nb, 2] bytes -> float32 [nb] of the float16 they hold."""
    return np.ascontiguousarray(b).view(np.float16)[:, 0].astype(np.float32)


def _nibble_codes(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 codes: value i in byte i's low nibble, value 16 + i in its high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], 1)


def _read_q4_0(b):
    d = _halves(b[:, 0:2])
    return _nibble_codes(b[:, 2:18]), d, -8 * d


def _read_q4_1(b):
    return _nibble_codes(b[:, 4:20]), _halves(b[:, 0:2]), _halves(b[:, 2:4])


def _read_q5_0(b):
    d = _halves(b[:, 0:2])
    return _nibble_codes(b[:, 6:22]) | (np.unpackbits(b[:, 2:6], axis=1, bitorder="little") << 4), d, -16 * d


def _read_q5_1(b):
    q = _nibble_codes(b[:, 8:24]) | (np.unpackbits(b[:, 4:8], axis=1, bitorder="little") << 4)
    return q, _halves(b[:, 0:2]), _halves(b[:, 2:4])


def _read_q8_0(b):
    d = _halves(b[:, 0:2])
    return (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


# name: reader, for the types whose grid is one float16 scale (and low end) per 32 values
READABLE = {"Q4_0": _read_q4_0, "Q4_1": _read_q4_1, "Q5_0": _read_q5_0, "Q5_1": _read_q5_1, "Q8_0": _read_q8_0}


def read(data: np.ndarray, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The raw bytes [N, row bytes] of a weight [N, K] in a 32-value type -> (codes [N, K] uint8, scale and low end
    [N, K / 32] float32, bits): value = scale * code + low end, which is the file's value exactly (a float16 scale
    times a code of at most 8 bits, plus a float16 low end, as `gguf`'s dequantiser computes it). The K-quants
    scale each sub-block by a float16 times a 6- or 8-bit integer, which one float16 scale cannot hold."""
    if name not in READABLE:
        raise GGMLError(f"{name} is not one of the types read as codes ({', '.join(READABLE)})")
    n, k = shape
    block, nbytes = GGML_QUANT_SIZES[_qtype(name)]
    bits = _TYPES[name][2].bit_length()  # the largest code: 15, 31 or 255
    codes, scale, low = READABLE[name](np.ascontiguousarray(data, dtype=np.uint8).reshape(n * k // block, nbytes))
    return codes.reshape(n, k), scale.reshape(n, -1), low.reshape(n, -1), bits


# name: (values per block, values per scale, largest code, fitter, packer)
_TYPES = {
    "Q4_0": (32, 32, 15, _fit_sym(8), _pack_q4_0), "Q4_1": (32, 32, 15, _fit_asym(15), _pack_q4_1),
    "Q5_0": (32, 32, 31, _fit_sym(16), _pack_q5_0), "Q5_1": (32, 32, 31, _fit_asym(31), _pack_q5_1),
    "Q8_0": (32, 32, 255, _fit_q8_0, _pack_q8_0),
    "Q2_K": (QK_K, 16, 3, _fit_q2_k, _pack_q2_k), "Q3_K": (QK_K, 16, 7, _fit_q3_k, _pack_q3_k),
    "Q4_K": (QK_K, 32, 15, _fit_q4_k, _pack_q4_k), "Q5_K": (QK_K, 32, 31, _fit_q5_k, _pack_q5_k),
    "Q6_K": (QK_K, 16, 63, _fit_q6_k, _pack_q6_k),
}
