"""Packed low-bit weights: the format round-trips, every kernel (numba CPU path, Triton under
TRITON_INTERPRET=1) matches the dequantise-then-matmul reference on every shape, including shapes
the group size does not divide, and bad requests are refused with one clear error."""
import math

import numpy as np
import pytest
import torch

from lensbench.gpu import cpu_kernels, cpu_native, cpu_torch, dispatch, quant, reference
from lensbench.gpu.quant import QuantError

SHAPES = [(40, 100, 32), (33, 136, 64), (64, 256, 128), (24, 72, -1), (16, 520, 128)]  # (N, K, group)


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1


@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("n,k,gs", SHAPES)
def test_codes_round_trip_and_error_is_half_a_step(bits, n, k, gs):
    w = _weight(n, k)
    pw = quant.quantize(w, bits, gs)
    codes = quant.unpack(pw)
    assert codes.shape == (n, -(-k // 8) * 8) and int(codes.max()) <= (1 << bits) - 1
    assert codes[:, k:].eq(0).all()  # padding columns hold code 0
    w_hat = reference.dequantize(pw)
    assert w_hat.shape == w.shape
    # each value is within half a quantisation step of the original (plus float16 rounding of scale/min)
    step = torch.cat([pw.scales[:, i:i + 1].float().expand(-1, length) for i, (_, length)
                      in enumerate(pw.group_bounds())], 1)[:, :k]
    assert ((w_hat - w).abs() <= step / 2 + 2e-3 * w.abs().max()).all()
    # re-quantising the codes' dense values gives the same codes (the format is a fixed point)
    again = quant.quantize(w_hat, bits, gs)
    assert (reference.dequantize(again) - w_hat).abs().max() <= 1e-3 * w.abs().max()


@pytest.mark.parametrize("bits", quant.BITS)
def test_packed_bytes_are_what_the_format_says(bits):
    n, k, gs = 64, 576, 128
    pw = quant.quantize(_weight(n, k), bits, gs)
    groups = math.ceil(k / gs)
    assert pw.packed.dtype == torch.uint8 and pw.scales.dtype == torch.float16
    assert pw.nbytes == n * k * bits // 8 + n * groups * 4
    if bits == 4:
        assert pw.nbytes <= 0.3 * n * k * 2
    if bits == 8:
        assert pw.nbytes <= 0.55 * n * k * 2


@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("n,k,gs", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 40])  # decode (gemv) and prefill (tiled) paths
def test_cpu_kernel_matches_reference(bits, n, k, gs, rows, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "EXACT", True)  # the float32 kernels; torch's bfloat16 int4 one below
    pw = quant.quantize(_weight(n, k), bits, gs)
    x = torch.randn(rows, k)
    bias = torch.randn(n)
    ref = reference.matmul(x, pw, bias)
    out = cpu_kernels.matmul(x, pw, bias)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("n,k,gs,g", [(64, 576, 128, 64), (192, 576, 64, 64), (48, 256, 128, 128), (32, 512, 256, 256),
                                      (16, 96, 32, 32), (32, 72, -1, None), (40, 128, 32, None), (16, 520, 128, None)])
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_decode_on_torchs_kernel_matches_the_reference(n, k, gs, g, rows, monkeypatch):
    """int4 decode runs torch's bfloat16 kernel where its layout holds the weight (scales repeated onto a
    group size it takes), else the exact kernel: both within their rounding of the reference. (The native
    kernel, which takes most of these first, is off here: tests/test_cpu_native.py.)"""
    monkeypatch.setattr(cpu_native, "_enabled", False)
    pw = quant.quantize(_weight(n, k), 4, gs)
    assert cpu_torch.int4_group(pw) == g
    x, bias = torch.randn(rows, k), torch.randn(n)
    ref = reference.matmul(x, pw, bias)
    out = cpu_kernels.matmul(x, pw, bias)
    tol = 1e-5 if g is None else 1e-2  # bfloat16 activations, scales and zeros: 8 significant bits
    assert out.shape == ref.shape and (out - ref).abs().max() <= tol * ref.abs().max()
    assert ("_torch_layout" in pw.__dict__) == (g is not None)
    cpu_kernels.set_exact(True)
    try:
        assert (cpu_kernels.matmul(x, pw, bias) - ref).abs().max() <= 1e-5 * ref.abs().max()
    finally:
        cpu_kernels.set_exact(False)


@pytest.mark.parametrize("scheme,gs,torchs", [("sym", -1, True), ("sym", 64, False), ("asym", -1, False)])
@pytest.mark.parametrize("k", [200, 40, 576])  # K not a multiple of 32 is padded (the kernel crashes on it)
def test_int8_decode_on_torchs_kernel_for_symmetric_rows(scheme, gs, torchs, k, monkeypatch):
    monkeypatch.setattr(cpu_native, "_enabled", False)  # the native kernel takes K = 576 first
    pw = quant.quantize(_weight(48, k), 8, gs, symmetric=scheme == "sym")
    torchs = torchs or (scheme == "sym" and gs >= k)  # one group per row however it was asked for
    assert cpu_torch.supported(pw) == torchs
    x = torch.randn(2, k)
    ref = reference.matmul(x, pw)
    out = cpu_kernels.matmul(x, pw)
    assert (out - ref).abs().max() <= (1e-2 if torchs else 1e-5) * ref.abs().max()


def test_int4_layout_converts_rows_in_chunks_like_torch_at_once(monkeypatch):
    pw = quant.quantize(_weight(160, 64), 4, 32)
    whole = torch._convert_weight_to_int4pack_for_cpu(quant.unpack(pw).to(torch.int32), 1)
    monkeypatch.setattr(cpu_torch, "CHUNK", 64)  # 3 chunks, the last one short
    k, packed, g, sz = cpu_torch.layout(pw)
    assert torch.equal(packed, whole) and g == 32 and sz.shape == (2, 160, 2)


def test_cpu_tiled_path_holds_one_tile_not_the_weight():
    pw = quant.quantize(_weight(600, 64), 4, 32)
    x = torch.randn(30, 64)
    out = cpu_kernels.tiled(x, pw, tile=128, exact=True)  # 5 tiles, the last one short
    assert torch.allclose(out, reference.matmul(x, pw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bfloat16_tiles_are_the_grid_values_rounded_to_nearest_even(bits):
    pw = quant.quantize(_weight(600, 72), bits, 32)
    p, sc, mn = pw.numpy_views()
    tile = torch.empty(600, pw.k_padded, dtype=torch.bfloat16)
    cpu_kernels._kernels(bits)[2](p, sc, mn, pw.group_size, cpu_kernels._H2F, 0,
                                  tile.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(tile[:, :72], reference.dequantize(pw).to(torch.bfloat16))  # torch's rounding, bit for bit
    x = torch.randn(30, 72)
    out = cpu_kernels.tiled(x, pw, tile=128, exact=False)  # the default where the CPU has bfloat16 dot products
    want = (x.to(torch.bfloat16).float() @ reference.dequantize(pw).to(torch.bfloat16).float().T)
    assert out.dtype == torch.float32 and (out - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,gs", [(40, 100, 32), (70, 200, 64), (24, 72, -1)])
@pytest.mark.parametrize("rows", [1, 19])
def test_triton_kernel_matches_reference_in_interpreter(dtype, tol, bits, n, k, gs, rows):
    pytest.importorskip("triton")
    from lensbench.gpu import triton_kernels

    pw = quant.quantize(_weight(n, k), bits, gs)
    x = torch.randn(rows, k).to(dtype)
    ref = reference.matmul(x.float(), pw)
    out = triton_kernels.matmul(x, pw)
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()


def test_dispatch_picks_the_cpu_kernel_on_cpu_and_embedding_lookup_reads_rows():
    pw = quant.quantize(_weight(50, 40), 4, 32)
    assert dispatch.kernel_for(torch.zeros(1, 40), pw) == "cpu"
    ids = torch.tensor([[3, 7, 3], [49, 0, 1]])
    rows = dispatch.embedding(ids, pw, torch.float32)
    assert rows.shape == (2, 3, 40)
    assert torch.equal(rows, reference.dequantize(pw)[ids])


@pytest.mark.parametrize("bits,gs,msg", [(7, 128, "bits=7"), (4, 12, "multiple of 8"), (4, 0, "positive"),
                                         (True, 128, "bits=True"), (8, 64.0, "group_size=64.0")])
def test_bad_specs_are_refused(bits, gs, msg):
    with pytest.raises(QuantError, match=msg):
        quant.quantize(_weight(4, 64), bits, gs)


def test_unpadded_group_that_does_not_divide_is_refused():
    with pytest.raises(QuantError, match="does not divide in_features=100"):
        quant.quantize(_weight(4, 100), 4, 64, pad=False)
    quant.quantize(_weight(4, 128), 4, 64, pad=False)  # divides: fine


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_weights_are_refused(bad):
    w = _weight(4, 64)
    w[1, 3] = bad
    with pytest.raises(QuantError, match="NaN/Inf"):
        quant.quantize(w, 4, 32)


def test_weights_beyond_float16_range_are_refused():
    w = _weight(4, 64)
    w[0, 0] = 1e6
    with pytest.raises(QuantError, match="float16"):
        quant.quantize(w, 8, 32)


def test_gpu_check_dry_run_runs_every_case_and_writes_the_report(tmp_path):
    """benchmarks/gpu_check.py is run for real only on a GPU; its dry run keeps it from rotting here."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    out = tmp_path / "GPU.md"
    run = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    assert "288 of 288 cases within tolerance" in text and "4096x14336" in text and "int4 g128" in text
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True)
        assert refused.returncode == 2 and "no CUDA device" in refused.stderr and "--dry-run" in refused.stderr


def test_adaptive_threads_measure_each_count_then_run_the_fastest_and_re_explore():
    from lensbench.gpu.threads import Adaptive, candidates

    assert candidates(1) == [1] and candidates(2) == [1, 2] and candidates(6) == [1, 2, 4, 6]
    policy = Adaptive(2, explore=8)
    seconds = {1: 0.03, 2: 0.01}  # 2 threads faster (a quiet machine)
    ran = []
    for _ in range(24):
        n = policy.choose()
        ran.append(n)
        policy.record(n, seconds[n])
    assert ran[:4] == [1, 1, 2, 2]  # each measured twice first
    assert ran[4:].count(1) == 3 and ran[7] == 1  # then the fastest, the other once per 8 steps
    seconds = {1: 0.03, 2: 0.2}  # load arrives: 2 threads now stall at every barrier
    for _ in range(40):
        n = policy.choose()
        policy.record(n, seconds[n])
    assert policy.best() == 1
    spiky = Adaptive(2)  # most steps on 2 threads quick, one in three a scheduler slice late: slower on the whole
    for i in range(8):
        spiky.record(1, 0.03)
        spiky.record(2, 0.1 if i % 3 == 0 else 0.01)
    assert spiky.best() == 1  # (2 x 0.1 + 5 x 0.01) / 7 > 0.03 without the slowest; the median (0.01) chooses 2
    once = Adaptive(2)  # one slow step alone is dropped
    for i in range(8):
        once.record(1, 0.03)
        once.record(2, 0.1 if i == 0 else 0.01)
    assert once.best() == 2


def test_adaptive_threads_wrap_decode_steps_only_and_give_the_users_setting_back():
    from lensbench.gpu import threads

    class Net(torch.nn.Module):
        def forward(self, input_ids=None):
            if input_ids.numel() == 3:
                raise RuntimeError("boom")
            return torch.get_num_threads()

    user = torch.get_num_threads()
    net = Net()
    remove = threads.install(net, max_tokens=4)
    try:
        used = [net(input_ids=torch.zeros(1, 1, dtype=torch.long)) for _ in range(6)]
        assert set(used) <= set(threads.candidates(user)) and torch.get_num_threads() == user
        assert net(input_ids=torch.zeros(1, 20, dtype=torch.long)) == user  # prefill: the user's count
        with pytest.raises(RuntimeError):
            net(input_ids=torch.zeros(1, 3, dtype=torch.long))
        net(input_ids=torch.zeros(1, 20, dtype=torch.long))
        assert torch.get_num_threads() == user  # restored after a step that raised
        assert sum(len(t) for t in net.lensbench_threads.times.values()) == 6
    finally:
        remove()
    assert "lensbench_threads" not in net.__dict__ and torch.get_num_threads() == user
