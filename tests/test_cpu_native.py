"""The native int4/int8 kernel (`gpu/cpu_native.py`, AVX512-VNNI): agreement with the arithmetic it claims
(16-bit activations per group, exact integer dots, exact min term) on every code path (tail rows, a short last
group, a 32-byte int4 remainder, one group per row, several activation rows, a zero group), the decode dispatch
that picks it, and what happens where it cannot be built."""
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from lensbench.gpu import cpu_kernels, cpu_native, reference
from lensbench.gpu.quant import quantize

native = pytest.mark.skipif(not cpu_native.available(), reason=f"{cpu_native.unavailable()}")


def _cpu_runs_it() -> bool:
    """An x86-64 Linux CPU with the instructions the kernel needs, a C++ compiler, the kernel not turned off."""
    if sys.platform != "linux" or platform.machine() != "x86_64" or os.environ.get("LENSBENCH_NATIVE") == "0":
        return False
    with open("/proc/cpuinfo") as f:
        flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    needed = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    return needed <= set(flags) and shutil.which(cpu_native._compiler()) is not None


@pytest.mark.skipif(not _cpu_runs_it(), reason="no AVX512-VNNI CPU with a C++ compiler here")
def test_builds_where_the_cpu_and_a_compiler_allow():
    # the other tests skip where it is unavailable: a source that does not compile must fail here, not skip
    assert cpu_native.unavailable() is None


def _int16_activations(x, pw):
    """x rounded as the kernel rounds it: per group, d = max|x| / LEVELS, q = round(x / d)."""
    out = torch.empty_like(x, dtype=torch.float64)
    for start, length in pw.group_bounds():
        g = x[:, start:start + length]
        d = g.abs().amax(-1, keepdim=True) / cpu_native.LEVELS
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        out[:, start:start + length] = torch.round(g * inv).double() * d.double()
    return out


def _expected(x, pw):
    """sum_g scale * (q . x_int16) + min * sum(x), in float64."""
    xq = _int16_activations(x, pw)
    w = reference.dequantize(pw).double()  # q * scale + min
    y = xq @ w.T
    for g, (start, length) in enumerate(pw.group_bounds()):  # the min term on the exact activations
        s = (x[:, start:start + length].double() - xq[:, start:start + length]).sum(1, keepdim=True)
        y += s * pw.mins[:, g].double()
    return y


@native
@pytest.mark.parametrize("bits,n,k,group,m", [
    (4, 37, 576, 128, 1),  # N not a multiple of the 4 rows computed together; a last group of 64
    (4, 64, 576, 128, 3),
    (4, 16, 384, 192, 2),  # groups of 192: a 64-byte step and a 32-byte remainder each
    (4, 9, 256, 256, 32),  # the most activation rows it takes
    (4, 8, 128, 64, 1),
    (4, 12, 96, 32, 2),  # groups of 32: one 16-byte step each
    (4, 7, 224, 96, 1),  # groups of 96: a 32-byte and a 16-byte step each
    (4, 11, 1088, 32, 1),  # decode past 16 groups a row (34): a block's factors span rows in each vector; 3 rows last
    (4, 11, 224, 96, 5),  # several rows on 16-bit words: 32- and 16-byte steps, a last block of 3, an odd row left
    (4, 8, 640, 320, 4),  # words: 64-byte steps of read_order taken 32 bytes at a time, then a 32-byte step
    (8, 37, 576, 128, 2),
    (8, 10, 1536, -1, 1),  # one group per row
    (8, 5, 192, 64, 32),
    (8, 6, 160, 32, 3),  # 32-byte steps
    (8, 4, 224, 96, 1),  # a 64-byte and a 32-byte step
    (8, 6, 640, 32, 1),  # decode with 20 groups a row; a last block of 2 rows
    (8, 8, 160, 32, 5),  # words: whole blocks, activation rows in pairs and one left
])
def test_matches_its_arithmetic(bits, n, k, group, m):
    torch.manual_seed(n + k)
    pw = quantize(torch.randn(n, k), bits, group)
    x = torch.randn(m, k) * torch.linspace(0.1, 4, k)  # groups of different magnitude
    x[0, :pw.group_bounds()[0][1]] = 0  # a group of zeros: d = 0, no division by zero
    y = cpu_native.matmul(x, pw)
    want = _expected(x, pw)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max()
    exact = reference.matmul(x, pw)  # and what rounding the activations to int16 costs against float32
    assert (y - exact).abs().max() <= 5e-4 * exact.abs().max()


@native
@pytest.mark.parametrize("bits,group", [(8, 4096), (4, 8192)])
@pytest.mark.parametrize("m", [1, 2])
def test_largest_groups_sum_exactly_at_the_largest_codes_and_activations(bits, group, m):
    """Every code at its top level and every activation at the top of its range: each int32 lane holds the
    most it can (int8 groups of 4096: 2.13e9 of 2^31), and the sums are still the exact q . xq, on both paths:
    one row's two byte planes (256 * hi + lo) and several rows' 16-bit words."""
    w = torch.ones(4, group)
    w[:, 0] = 0  # min 0, max 1: every other code is 2^bits - 1
    pw = quantize(w, bits, group)
    x = torch.stack([torch.full((group,), 3.0), torch.full((group,), -3.0)])[:m]  # the top level, the bottom one
    y = cpu_native.matmul(x, pw)
    want = _expected(x, pw)
    assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max()


@native
def test_decode_dispatch_follows_the_crossover_and_exact_keeps_float32():
    torch.manual_seed(0)
    pw4, pw8 = quantize(torch.randn(48, 192), 4, 64), quantize(torch.randn(48, 192), 8, 64)
    odd = quantize(torch.randn(40, 192), 4, 64)  # N % 16 != 0: torch's int4 kernel does not hold it
    # from 25 rows the tiles, not torch's kernels (whose layout would be a second copy of the codes)
    assert cpu_native.supported(pw4) and cpu_native.supported(pw8)
    cpu_kernels.matmul(torch.randn(30, 192), pw4)
    assert "_torch_layout" not in pw4.__dict__
    for rows, pw, native in ((1, pw4, True), (24, pw4, True), (2, odd, True), (24, pw8, True), (25, pw4, False)):
        x = torch.randn(rows, 192)
        assert torch.equal(cpu_kernels.matmul(x, pw), cpu_native.matmul(x, pw)) == native, (rows, pw)
    x = torch.randn(1, 192)
    with cpu_kernels.exact_kernels():
        exact = reference.matmul(x, pw4)
        assert (cpu_kernels.matmul(x, pw4) - exact).abs().max() <= 1e-5 * exact.abs().max()
    for bits, group in ((4, 48), (8, 16), (3, 64), (2, 64)):  # what it does not hold goes to the other kernels
        assert not cpu_native.holds(quantize(torch.randn(48, 192), bits, group))
    assert not cpu_native.holds(quantize(torch.randn(8, 200), 4, 64))  # K padded to 200: a group of 8
    assert not cpu_native.holds(quantize(torch.randn(2, 8192), 8, -1))  # int8 groups over 4096 could overflow
    assert not cpu_native.holds(quantize(torch.randn(1, 65536), 4, -1))  # as could int4 groups of 65536


@native
def test_without_a_compiler_it_says_why_and_decode_runs_on_torch(tmp_path):
    code = ("import torch; from lensbench.gpu import cpu_native, cpu_kernels, quant\n"
            "print(cpu_native.unavailable())\n"
            "pw = quant.quantize(torch.randn(32, 128), 4, 64)\n"
            "print(cpu_kernels.matmul(torch.randn(1, 128), pw).shape)\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "LENSBENCH_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    why, shape = out.stdout.strip().splitlines()
    assert why.startswith("the native kernel did not build (no C++ compiler") and "torch's" in why
    assert shape == "torch.Size([1, 32])"


@native
@pytest.mark.parametrize("bits,k,group", [(4, 576, 128), (4, 640, 32), (4, 256, -1), (8, 576, 64), (8, 1536, 128)])
def test_dequant_matches_the_grid_and_rounds_bfloat16_to_nearest_even(bits, k, group):
    torch.manual_seed(0)
    pw = quantize(torch.randn(70, k), bits, group)
    want = reference.dequantize(pw)[20:53]  # q * scale + min in float32
    out = cpu_native.dequantize(pw, 20, torch.empty(33, pw.k_padded))
    assert (out[:, :k] - want).abs().max() <= 1e-6 * want.abs().max()
    half = cpu_native.dequantize(pw, 20, torch.empty(33, pw.k_padded, dtype=torch.bfloat16))
    assert torch.equal(half, out.bfloat16())  # torch's float32 -> bfloat16 rounds to nearest even
    with pytest.raises(RuntimeError, match="within the weight's N rows"):
        cpu_native.dequantize(pw, 60, torch.empty(33, pw.k_padded))


@native
def test_prefill_tiles_come_from_the_native_op_with_the_numba_path_s_values():
    torch.manual_seed(0)
    pw, x = quantize(torch.randn(300, 576), 4, 128), torch.randn(40, 576)
    ours = cpu_kernels.tiled(x, pw, tile=128)  # three tiles, the last one short
    cpu_native.set_enabled(False)
    try:
        numba = cpu_kernels.tiled(x, pw, tile=128)
    finally:
        cpu_native.set_enabled(True)
    assert torch.equal(ours, numba)
    exact = reference.matmul(x, pw)
    assert (cpu_kernels.tiled(x, pw, exact=True) - exact).abs().max() <= 1e-4 * exact.abs().max()
