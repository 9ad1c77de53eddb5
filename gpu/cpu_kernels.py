"""CPU path for the packed format (numba): never materialises the whole dense weight.

* `gemv` — few rows of activations (decode): for each output row, each group's codes are unpacked
  into a small per-thread buffer and dotted with the activations; the group's scale multiplies
  the integer dot product and its min multiplies the group's activation sum:
      y[m, n] = sum_g scale[n, g] * (q[n, g] . x[m, g]) + min[n, g] * sum(x[m, g])
  Threads split the output rows.
* `tiled` — many rows (prefill): `TILE` output rows at a time are dequantised (by the native op on torch's
  threads where it holds the weight, `cpu_native.dequantize`; else here on the calling thread: see
  `dequant_rows`) into one reused buffer and multiplied with torch's GEMM, so peak extra memory is one tile,
  not the weight. The tile is bfloat16 and so are the activations (torch's decode kernels round them so too),
  float32 with `set_exact(True)`.

Scales and mins are stored as float16 (numba has no CPU float16): a 65,536-entry table turns
their bit patterns into float32.
"""
from __future__ import annotations

import contextlib
import os
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from . import cpu_native, cpu_torch
from .quant import PackedWeight

EXACT = os.environ.get("LENSBENCH_EXACT_KERNELS") == "1"  # float32 everywhere: no bfloat16 kernels or tiles


def _bf16_dot() -> bool:
    """Whether this CPU has bfloat16 dot products (AVX512-BF16 or AMX), where torch's bfloat16 GEMM is faster than
    its float32 one; elsewhere it has no bfloat16 dot products to gain from (not measured here), so prefill
    keeps float32 tiles."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(p is not None and p() for p in probes)


BF16_TILES = _bf16_dot()
# Above these many activation rows the tiled dequantise + GEMM path is faster (benchmarks/decode.py measures
# both paths by rows on SmolLM2's linears, reports/DECODE.md): numba's gemv, and torch's int4/int8 kernels.
GEMV_MAX_ROWS = 12
TORCH_MAX_ROWS = 32
ROWS_PER_TASK = 64  # output rows per parallel task of gemv (each task allocates its buffer once)
TILE = 256  # the fewest output rows dequantised at a time by the tiled path
TILE_BYTES = 8 << 20  # its float32 buffer: SmolLM2's linears fit whole (one GEMM each), its LM head in 14 tiles
_H2F = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


# Kernels index through slices with loop counters that start at 0: numba then knows every index
# is non-negative and LLVM vectorises the loops (signed `base + j` indexing runs ~12x slower).


@njit(inline="always", fastmath=True)
def _codes(pg, length, bits, buf):
    """Unpack the `length` codes of one group (its packed bytes `pg`) into buf, in input order."""
    if bits == 8:
        for j in range(length):
            buf[j] = pg[j]
    elif bits == 4:
        h = length // 2
        hi = buf[h:]
        for j in range(h):
            buf[j] = pg[j] & 15
            hi[j] = pg[j] >> 4
    elif bits == 2:
        e = length // 4
        b1, b2, b3 = buf[e:], buf[2 * e:], buf[3 * e:]
        for j in range(e):
            b = pg[j]
            buf[j] = b & 3
            b1[j] = (b >> 2) & 3
            b2[j] = (b >> 4) & 3
            b3[j] = b >> 6
    elif bits == 3:  # three byte planes of length/8 bytes
        e = length // 8
        mid, top = pg[e:], pg[2 * e:]
        for j in range(e):
            w = np.int32(pg[j]) | (np.int32(mid[j]) << 8) | (np.int32(top[j]) << 16)
            for t in range(8):
                buf[j + t * e] = (w >> (3 * t)) & 7
    else:  # 5 and 6 bits: `bits` byte planes of length/8 bytes, each word holding 8 codes
        e = length // 8
        mask = (1 << bits) - 1
        for j in range(e):
            w = np.int64(0)
            for p in range(bits):
                w |= np.int64(pg[p * e + j]) << (8 * p)
            for t in range(8):
                buf[j + t * e] = (w >> (bits * t)) & mask


@njit(inline="always", fastmath=True)
def _dot_group(pg, length, bits, xg, buf):
    """codes . xg for one group; int8 and int4 read the packed bytes directly (the decode hot path)."""
    d = np.float32(0.0)
    if bits == 8:
        for j in range(length):
            d += np.float32(pg[j]) * xg[j]
    elif bits == 4:
        h = length // 2
        xh = xg[h:]
        for j in range(h):
            b = pg[j]
            d += np.float32(b & 15) * xg[j] + np.float32(b >> 4) * xh[j]
    else:
        _codes(pg, length, bits, buf)
        for j in range(length):
            d += buf[j] * xg[j]
    return d


def _make_kernels(bits: int):
    """(gemv, dequant_rows) compiled for one bit-width: `bits` is a compile-time constant, so the
    per-format branches vanish and the inner loops vectorise."""

    @njit(parallel=True, fastmath=True, nogil=True)
    def gemv(x, p, sc, mn, gs, h2f, out):
        m_rows, k_pad = x.shape
        n_out, n_groups = sc.shape
        xsum = np.zeros((m_rows, n_groups), np.float32)
        for m in range(m_rows):
            for g in range(n_groups):
                xsum[m, g] = x[m, g * gs:min(k_pad, g * gs + gs)].sum()
        for c in prange((n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            buf = np.empty(gs, np.float32)  # once per task: an allocation per row cost more than the row
            for n in range(c * ROWS_PER_TASK, min(n_out, c * ROWS_PER_TASK + ROWS_PER_TASK)):
                row = p[n]
                for m in range(m_rows):
                    xm = x[m]
                    acc = np.float32(0.0)
                    for g in range(n_groups):
                        base = g * gs
                        d = _dot_group(row[base * bits // 8:], min(gs, k_pad - base), bits, xm[base:], buf)
                        acc += d * h2f[sc[n, g]] + h2f[mn[n, g]] * xsum[m, g]
                    out[m, n] = acc

    @njit(parallel=True, fastmath=True, nogil=True)
    def gemv4(x, p, sc, mn, gs, h2f, out):
        # With b = lo + 16 hi:  lo.x_lo + hi.x_hi = b.x_lo + hi.(x_hi - 16 x_lo), so each packed byte
        # is read once and converted twice without a mask (measured ~1.8x faster than unpacking both
        # nibbles; rounding stays ~1e-6 relative). `xt` holds x_hi - 16 x_lo per group.
        m_rows, k_pad = x.shape
        n_out, n_groups = sc.shape
        xsum = np.zeros((m_rows, n_groups), np.float32)
        xt = np.empty((m_rows, k_pad // 2), np.float32)
        for m in range(m_rows):
            for g in range(n_groups):
                base = g * gs
                length = min(gs, k_pad - base)
                h = length // 2
                xsum[m, g] = x[m, base:base + length].sum()
                lo, hi, t = x[m, base:], x[m, base + h:], xt[m, base // 2:]
                for j in range(h):
                    t[j] = hi[j] - np.float32(16.0) * lo[j]
        for n in prange(n_out):
            row = p[n]
            for m in range(m_rows):
                xm, tm = x[m], xt[m]
                acc = np.float32(0.0)
                for g in range(n_groups):
                    base = g * gs
                    h = min(gs, k_pad - base) // 2
                    pg, xg, tg = row[base // 2:], xm[base:], tm[base // 2:]
                    d = np.float32(0.0)
                    for j in range(h):
                        d += np.float32(pg[j]) * xg[j] + np.float32(pg[j] >> 4) * tg[j]
                    acc += d * h2f[sc[n, g]] + h2f[mn[n, g]] * xsum[m, g]
                out[m, n] = acc

    # Dequantising runs on the calling thread (the tiled path and lookups). numba's parallel loops run on the
    # system's OpenMP runtime and torch's GEMM on the one torch ships: two thread pools, each spinning after its
    # region while the other wants the cores. Alternating them (dequantise, GEMM, dequantise, ...) over SmolLM2's
    # 210 block linears at 1 row took 20 ms in some decode benchmark runs and 108-143 ms in others (the crossover
    # tables in reports/BENCHMARKS.md); on one thread the run since gave 21-23 ms.
    @njit(fastmath=True, nogil=True)
    def dequant_rows(p, sc, mn, gs, h2f, n0, out):
        rows, k_pad = out.shape
        n_groups = sc.shape[1]
        buf = np.empty(gs, np.float32)
        for r in range(rows):
            n = n0 + r
            row = p[n]
            for g in range(n_groups):
                base = g * gs
                length = min(gs, k_pad - base)
                s = h2f[sc[n, g]]
                lo = h2f[mn[n, g]]
                dst = out[r, base:]
                pg = row[base * bits // 8:]
                if bits == 4:  # straight from the bytes: the low nibbles are the group's first half
                    h = length // 2
                    dhi = dst[h:]
                    for j in range(h):
                        dst[j] = np.float32(pg[j] & 15) * s + lo
                        dhi[j] = np.float32(pg[j] >> 4) * s + lo
                elif bits == 8:
                    for j in range(length):
                        dst[j] = np.float32(pg[j]) * s + lo
                else:
                    _codes(pg, length, bits, buf)
                    for j in range(length):
                        dst[j] = buf[j] * s + lo

    @njit(fastmath=True, nogil=True)
    def dequant_rows_bf16(p, sc, mn, gs, h2f, n0, out):
        """`dequant_rows` into bfloat16 bit patterns (uint16 [rows, K_pad]), rounded to nearest even."""
        rows, k_pad = out.shape
        row = np.empty((1, k_pad), np.float32)
        u = row.view(np.uint32)[0]
        for r in range(rows):
            dequant_rows(p, sc, mn, gs, h2f, n0 + r, row)
            dst = out[r]
            for j in range(k_pad):
                b = u[j]
                dst[j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    return (gemv4 if bits == 4 else gemv), dequant_rows, dequant_rows_bf16


_KERNELS: dict[int, tuple] = {}


def _kernels(bits: int):
    if bits not in _KERNELS:
        _KERNELS[bits] = _make_kernels(bits)
    return _KERNELS[bits]


def _arrays(pw: PackedWeight):
    return pw.numpy_views()


def _padded(x2: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    if x2.dtype != torch.float32:
        x2 = x2.to(torch.float32)
    k = pw.shape[1]
    if k % 8:
        x2 = torch.nn.functional.pad(x2, (0, pw.k_padded - k))
    return x2 if x2.is_contiguous() else x2.contiguous()


def gemv(x2: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """x2 [M, K] float -> [M, N] float32 with the per-row unpacking kernel."""
    xp = _padded(x2, pw)
    out = torch.empty(xp.shape[0], pw.shape[0], dtype=torch.float32)
    p, sc, mn = _arrays(pw)
    _kernels(pw.bits)[0](xp.numpy(), p, sc, mn, pw.group_size, _H2F, out.numpy())
    return out


_BUFFERS = threading.local()


def _buffer(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scratch buffer of at least `numel` values of `dtype`, kept per thread: a fresh multi-MB tensor per call
    is fresh pages from the OS each time, faulted in on every call (the tiled path's time is in the decode
    benchmark's crossover table)."""
    name = f"buf_{dtype}"
    buf = getattr(_BUFFERS, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_BUFFERS, name, buf)
    return buf[:numel]


def _dequantiser(pw: PackedWeight, buf: torch.Tensor, exact: bool):
    """`dequant(n0, rows)`: rows n0 .. n0 + rows of `pw` into buf[:rows]. The native op where it holds `pw` (on
    torch's threads, vectorised: the crossover table's tiles column), else numba's loop on the calling thread."""
    if cpu_native.supported(pw):
        return lambda n0, rows: cpu_native.dequantize(pw, n0, buf[:rows])
    # numba writes the bfloat16 tile as its bit patterns (it has no bfloat16 type)
    target = buf.numpy() if exact else buf.view(torch.int16).numpy().view(np.uint16)
    p, sc, mn = _arrays(pw)
    kernel = _kernels(pw.bits)[1 if exact else 2]
    return lambda n0, rows: kernel(p, sc, mn, pw.group_size, _H2F, n0, target[:rows])


def tiled(x2: torch.Tensor, pw: PackedWeight, tile: int | None = None, exact: bool | None = None) -> torch.Tensor:
    """x2 [M, K] float -> [M, N] float32 (contiguous), dequantising `tile` output rows at a time into one
    reused buffer (default: as many rows as fit in TILE_BYTES, at least TILE). Unless `exact` the tiles, the
    activations and the GEMM are bfloat16, as torch's decode kernels (`cpu_torch`) compute: on a CPU with
    bfloat16 dot products a bfloat16 GEMM is faster than a float32 one, which pays for dequantising (the decode
    benchmark's prefill table measures both against float32). Default: float32 with `EXACT` or on a CPU without
    bfloat16 dot products (`BF16_TILES`)."""
    exact = (EXACT or not BF16_TILES) if exact is None else exact
    xp = _padded(x2, pw)
    n = pw.shape[0]
    tile = min(tile or max(TILE, TILE_BYTES // (4 * pw.k_padded)), n)
    dtype = torch.float32 if exact else torch.bfloat16
    buf = _buffer(tile * pw.k_padded, dtype).view(tile, pw.k_padded)
    dequant = _dequantiser(pw, buf, exact)
    x = xp if exact else xp.to(torch.bfloat16)
    if tile == n:  # one tile: the GEMM writes [M, N] directly
        dequant(0, tile)
        return torch.mm(x, buf.T).float()
    # each tile's GEMM writes its columns of the [M, N] result in place (BLAS takes the row stride): the result
    # is contiguous, as attention needs (a transposed one sent q/k/v to SDPA with strided heads, and its math
    # kernel then ran packed prefill at 0.41x dense, reports/BENCHMARKS.md), without a transposing copy of it
    out = torch.empty(xp.shape[0], n, dtype=dtype)
    for n0 in range(0, n, tile):
        rows = min(tile, n - n0)
        dequant(n0, rows)
        torch.mm(x, buf[:rows].T, out=out[:, n0:n0 + rows])
    return out.float()


def matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W_hat.T (+ bias) on the CPU; float32 accumulation, result in x's dtype.
    Kept to a handful of tensor operations: at decode sizes Python overhead is a visible share."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    native = not EXACT and cpu_native.supported(pw)  # then never torch's kernels: their layout is a second copy
    if native and rows <= cpu_native.MAX_ROWS:
        y = cpu_native.matmul(x2, pw)
    elif not native and rows <= TORCH_MAX_ROWS and not EXACT and cpu_torch.supported(pw):
        y = cpu_torch.matmul(x2, pw)
    elif rows <= GEMV_MAX_ROWS:
        y = gemv(x2, pw)
    else:
        y = tiled(x2, pw)
    if bias is not None:
        y.add_(bias)  # y is float32 and freshly made
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], pw.shape[0]) if x.dim() != 2 else y


def dequantize_rows(pw: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    """Dense float32 rows [len(rows), K] (an embedding lookup), unpacked by the same kernel."""
    rows = rows.reshape(-1)
    sub = PackedWeight(pw.packed[rows].contiguous(), pw.scales[rows].contiguous(), pw.mins[rows].contiguous(),
                       pw.bits, pw.group_size, (rows.numel(), pw.shape[1]))
    out = torch.empty(rows.numel(), pw.k_padded, dtype=torch.float32)
    p, sc, mn = _arrays(sub)
    _kernels(pw.bits)[1](p, sc, mn, pw.group_size, _H2F, 0, out.numpy())
    return out[:, : pw.shape[1]]


def set_exact(exact: bool) -> None:
    """True: decode runs the exact float32 kernels here instead of torch's bfloat16 ones (`cpu_torch`), and
    prefill float32 tiles instead of bfloat16 ones."""
    global EXACT
    EXACT = bool(exact)


@contextlib.contextmanager
def exact_kernels(exact: bool = True):
    """`set_exact(exact)` inside the block, the setting before it afterwards."""
    before = EXACT
    set_exact(exact)
    try:
        yield
    finally:
        set_exact(before)


def set_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


set_threads(torch.get_num_threads())
