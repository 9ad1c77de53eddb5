"""Dense float32 linears of compiled decode steps on the native multi-threaded kernel (`native/dense.cpp`,
`gpu/compiled_dense.py`): the kernel's products are float32 dot products, the graph pass rewrites exactly the
decode-size linears of float32 weights, and a Decoder's tokens stay those of transformers' `generate`."""
import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from lensbench.decoding import Decoder
from lensbench.gpu import compiled_dense, cpu_native
from lensbench.testing import tiny_model

pytestmark = pytest.mark.skipif(not cpu_native.library_available(), reason=f"{cpu_native.unavailable()}")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (13, 576), (64, 1000)])
def test_kernel_is_the_float32_product(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k + 5, generator=g)[:, 3:k + 3]  # rows with a stride longer than K
    ref = (x.double() @ w.double().T).float()
    user = torch.get_num_threads()
    try:
        for threads in (1, 2):  # the weight's rows split over 1 and 2 threads
            torch.set_num_threads(threads)
            y = torch.ops.lensbench_native.dense_mm(x, w)
            assert y.shape == (m, n)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * k ** 0.5)
    finally:
        torch.set_num_threads(user)


def test_kernel_refuses_what_it_does_not_take():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lensbench_native.dense_mm(torch.randn(1, 8).double(), torch.randn(4, 8).double())
    with pytest.raises(RuntimeError, match="share K"):
        torch.ops.lensbench_native.dense_mm(torch.randn(1, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lensbench_native.dense_mm(torch.randn(1, 8), torch.randn(8, 4).T)


def _code(fn, *args):
    out, codes = run_and_get_code(fn, *args)
    return out, "\n".join(codes)


@pytest.mark.parametrize("rows", [1, compiled_dense.MAX_ROWS, compiled_dense.MAX_ROWS + 1])
def test_pass_rewrites_decode_size_float32_linears_only(rows):
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8, bias=False)).eval()
    step = torch.compile(net, dynamic=False, options={"post_grad_custom_post_pass": compiled_dense.PASS})
    x = torch.randn(rows, 40)
    with torch.no_grad():
        y, code = _code(step, x)
        torch.testing.assert_close(y, net(x))
    assert ("dense_mm" in code) == (rows <= compiled_dense.MAX_ROWS)
    half = torch.compile(net.to(torch.bfloat16), dynamic=False,
                         options={"post_grad_custom_post_pass": compiled_dense.PASS})
    with torch.no_grad():
        _, code = _code(half, x.to(torch.bfloat16))
    assert "dense_mm" not in code  # bfloat16 weights stay on torch's kernels


def test_decoder_tokens_on_the_native_dense_kernel_equal_transformers_generate():
    torch._dynamo.reset()
    llama = tiny_model("llama", seed=5, attn="sdpa")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, llama.module.config.vocab_size, (2, 9), generator=g)
    want = llama.module.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    dec = Decoder(llama, max_length=24)
    assert dec.native_dense
    out, code = _code(dec.generate, ids, 6)
    assert torch.equal(out, want)
    assert "dense_mm" in code
    torch_dense = Decoder(llama, max_length=24, native_dense=False)
    out, code = _code(torch_dense.generate, ids, 6)
    assert torch.equal(out, want) and not torch_dense.native_dense
    assert "dense_mm" not in code
