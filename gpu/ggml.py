"""llama.cpp's GGML block formats: which type a bit-width becomes, and quantisation into it.

`gguf` (the package) quantises F16/BF16/Q8_0/Q5_0/Q5_1/Q4_0/Q4_1 and only *dequantises* the
K-quants; the K-quant quantisers Q6_K, Q5_K, Q4_K, Q3_K and Q2_K are written here (numpy, vectorised
over super-blocks), byte for byte in the layout `gguf.quants.dequantize` reads, and tested against it.
They are plain round-to-nearest with quantised sub-block scales (8-bit Q6_K, 6-bit Q3_K/Q4_K/Q5_K,
4-bit Q2_K); llama.cpp's own reference searches a few scales per sub-block, so its error can be lower.

Which type a bit-width becomes (`ggml_type`): 8 -> Q8_0, 6 -> Q6_K, 5 -> Q5_K, 4 -> Q4_K, 3 -> Q3_K,
2 -> Q2_K. K-quants pack rows in super-blocks of 256 values; a row whose length is not a multiple of
256 (SmolLM2's 576) falls back, explicitly, to the 32-value type of at least the same bits per weight:
Q6_K -> Q8_0, Q5_K -> Q5_0, Q4_K/Q3_K/Q2_K -> Q4_0 (there is no 32-value type below 4 bits).
`bits_per_weight` gives the real cost of each type, so a file's reported bits are what it holds.
"""
from __future__ import annotations

import numpy as np

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


def quantize(w: np.ndarray, name: str) -> np.ndarray:
    """`w` [N, K] float32 -> the raw GGML bytes [N, K / block * bytes] of type `name`."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise GGMLError("the weight holds NaN/Inf values; quantising it would hide them")
    if name in _OWN:
        n, k = w.shape
        if k % QK_K:
            raise GGMLError(f"{name} needs rows that are multiples of {QK_K} values, got {k}")
        blocks = _OWN[name](w.reshape(-1, QK_K))
        return blocks.reshape(n, -1)

    return quants.quantize(w, _qtype(name))


def dequantize(data: np.ndarray, name: str) -> np.ndarray:
    """Raw GGML bytes of type `name` -> float32 values, with `gguf`'s own dequantiser."""

    return quants.dequantize(data, _qtype(name)).astype(np.float32, copy=False)


def roundtrip(w: np.ndarray, name: str) -> np.ndarray:
    """What a GGUF reader computes with: `w` quantised to `name` and read back."""
    return dequantize(quantize(w, name), name)


# --- the K-quant quantisers -----------------------------------------------------------------
def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _scale_min_codes(x: np.ndarray, qmax: int, smax: int = 63):
    """Asymmetric sub-block grids of Q2_K/Q4_K/Q5_K: x [nb, sub-blocks, values] -> (d, dmin [nb] fp16, sc,
    m [nb, sub-blocks] codes in 0..smax, q codes in 0..qmax) with x ~ d*sc*q - dmin*m."""
    lo = np.minimum(x.min(-1), 0.0)  # the format's minimum is subtracted, so it is <= 0
    hi = x.max(-1)
    scale = (hi - lo) / qmax
    mins = -lo
    d = _f16(scale.max(-1) / smax)
    dmin = _f16(mins.max(-1) / smax)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), 0, smax).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(mins, dmin.astype(np.float32)[:, None])), 0, smax).astype(np.uint8)
    eff = d.astype(np.float32)[:, None] * sc  # the scale and min a reader will use
    off = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint(_safe_div(x + off[..., None], eff[..., None])), 0, qmax).astype(np.uint8)
    return d, dmin, sc, m, q


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12 bytes of Q4_K/Q5_K (the layout gguf's get_scale_min reads)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q [nb, 8, 32] (low 4 bits used) -> 128 bytes: byte 32j+i holds sub-block 2j (low) and 2j+1 (high)."""
    q = q.reshape(q.shape[0], 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_codes(x.reshape(-1, 8, 32), 15)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_scale_min(sc, m), _nibbles(q)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_codes(x.reshape(-1, 8, 32), 31)
    high = (q >> 4) & 1  # [nb, 8, 32]: bit k of byte i is the high bit of value i of sub-block k
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for k in range(8):
        qh |= high[:, k] << k
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_scale_min(sc, m), qh, _nibbles(q)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    scale = np.abs(xs).max(-1) / 31  # signed 6-bit codes -32..31
    d = _f16(scale.max(-1) / 127)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), 0, 127).astype(np.int8)
    eff = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(_safe_div(xs, eff[..., None])), -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 128)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(nb, 128)
    h = high.reshape(nb, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """q [nb, 256] 2-bit codes -> 64 bytes: byte 32h+i holds value 128h + 32s + i in bits 2s..2s+1."""
    q = q.reshape(q.shape[0], 2, 4, 32) & 0x03
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(q.shape[0], 64)


def _q2_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_codes(x.reshape(-1, 16, 16), 3, 15)
    return np.concatenate([sc | (m << 4), _crumbs(q.reshape(-1, 256)), d.view(np.uint8).reshape(-1, 2),
                           dmin.view(np.uint8).reshape(-1, 2)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    # signed 3-bit codes -4..3: the sub-block's largest-magnitude value maps to -4 exactly (its scale may be
    # negative), so the asymmetric grid loses nothing at the extreme
    extreme = np.take_along_axis(xs, np.abs(xs).argmax(-1)[..., None], -1)[..., 0]
    scale = -extreme / 4
    d = _f16(np.abs(scale).max(-1) / 31)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), -32, 31).astype(np.int16)
    eff = d.astype(np.float32)[:, None] * sc
    u = (np.clip(np.rint(_safe_div(xs, eff[..., None])), -4, 3) + 4).astype(np.uint8).reshape(nb, 256)
    high = (u >> 2).reshape(nb, 8, 32)  # bit s of byte i: value 32s + i is >= 0
    hmask = np.zeros((nb, 32), np.uint8)
    for s in range(8):
        hmask |= high[:, s] << s
    s6 = (sc + 32).astype(np.uint8)  # 6-bit codes, offset by 32
    low, top = s6 & 0x0F, s6 >> 4
    scales = np.concatenate([low[:, :8] | (low[:, 8:] << 4),
                             top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)], axis=1)
    return np.concatenate([hmask, _crumbs(u), scales, d.view(np.uint8).reshape(-1, 2)], axis=1)


_OWN = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
