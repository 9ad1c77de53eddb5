"""GPTQ (Frantar et al., 2023): the fast implementation (Cholesky of H⁻¹, lazy column blocks, act-order, group
grids) against a slow column-by-column reference, a case solved by hand, its layer error against RTN's on every
linear of a tiny model, the sequential pipeline, plans that carry the method, and bad input."""
import json

import numpy as np
import pytest
import torch

from lensbench.compress.apply import apply
from lensbench.compress.gptq import GPTQConfig, gptq_ggml, gptq_weight, layer_error, prepare, quantize_model
from lensbench.compress.plan import Plan, Quant
from lensbench.errors import LensbenchError, PlanError
from lensbench.gpu import ggml
from lensbench.gpu.quant import QuantError, clipped_grid, dequantized, grid, round_to_grid
from lensbench.gpu.reference import dequantize
from lensbench.profiling import model_card
from lensbench.simquant import block_linears
from lensbench.testing import SAMPLE_TEXTS


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, gs: int, symmetric: bool, damp: float,
                   ggml_grid=None, clip=False):
    """The optimal-brain-quantisation update done literally: one column at a time with the inverse Hessian
    updated by Gaussian elimination of the quantised column (no Cholesky, no lazy blocks). With `ggml_grid`
    (a `gpu.ggml.Grid` fitted to the original weights) each column rounds onto that fixed grid instead; with
    `clip` each group's grid is the H_jj-weighted clipped one."""
    w = w.double().clone()
    n, k = w.shape
    importance = torch.diag(h).clone()
    h = h.double() + damp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    for j in range(k):
        if ggml_grid is not None:
            s = torch.from_numpy(ggml_grid.scale[:, j // ggml_grid.sub]).double()
            low = torch.from_numpy(ggml_grid.low[:, j // ggml_grid.sub]).double()
            code = torch.where(s != 0, torch.round((w[:, j] - low) / torch.where(s != 0, s, 1)), 0)
            q = code.clamp(0, ggml_grid.qmax) * s + low
        else:
            if j % gs == 0:
                span = w[:, j:min(j + gs, k)].float()
                s, m = (clipped_grid(span, bits, symmetric, importance[j:j + gs]) if clip else
                        grid(span, bits, symmetric))
            q = dequantized(round_to_grid(w[:, j:j + 1].float(), s, m, bits, symmetric), s, m)[:, 0].double()
        out[:, j] = q
        e = (w[:, j] - q) / hinv[j, j]
        w[:, j + 1:] -= e[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]  # eliminate column j
    return out


def problem(n=24, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(400, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    return w, 2 * x.T.double() @ x.double() / 400


@pytest.mark.parametrize("bits,gs,sym,clip", [(4, 32, False, False), (3, 32, True, False), (4, 96, False, False),
                                              (2, 48, False, False), (3, 32, False, True), (4, 96, True, True)])
def test_fast_gptq_matches_the_column_by_column_reference(bits, gs, sym, clip):
    w, h = problem()
    cfg = GPTQConfig(block=64, act_order=False, clip=clip)
    fast = dequantize(gptq_weight(w, h, bits, gs, sym, cfg).packed).double()
    slow = reference_gptq(w, h, bits, gs, sym, damp=0.01, clip=clip)
    same = torch.isclose(fast, slow, atol=1e-4)
    assert same.float().mean() > 0.995  # a rounding tie may fall the other way in a different summation order
    assert layer_error(w, fast, h) == pytest.approx(layer_error(w, slow, h), rel=1e-3)


def test_a_solve_runs_on_the_policys_thread_count_and_its_codes_do_not_depend_on_it():
    """Each solve runs on the count the shared policy picks (1 under load, where 2 threads crawl) and is timed for
    it, the caller's count comes back, and the codes are the same on 1 and 2 threads (a SmolLM2 MLP shape)."""
    from lensbench.compress import gptq

    class Fixed:
        options = [1, 2]

        def __init__(self, n):
            self.n, self.seen, self.timed = n, [], []

        def choose(self):
            return self.n

        def record(self, n, seconds):
            self.timed.append(n)

    g = torch.Generator().manual_seed(3)
    w = torch.randn(1536, 576, generator=g) * 0.02
    x = torch.randn(1024, 576, generator=g)
    h = 2 * x.T @ x / 1024
    user, saved = torch.get_num_threads(), list(gptq._POLICY)
    torch.set_num_threads(2)
    try:
        codes = []
        for n in (1, 2):
            policy = Fixed(n)
            gptq._POLICY[:] = [policy]
            orig = gptq._obq
            gptq._obq = lambda *a, p=policy, f=orig: (p.seen.append(torch.get_num_threads()), f(*a))[1]
            try:
                codes.append(gptq_weight(w, h, 4, 128).packed)
            finally:
                gptq._obq = orig
            assert policy.seen == [n] and policy.timed == [n] and torch.get_num_threads() == 2
        assert torch.equal(codes[0].packed, codes[1].packed) and torch.equal(codes[0].scales, codes[1].scales)
    finally:
        gptq._POLICY[:] = saved
        torch.set_num_threads(user)


def test_the_thread_policy_explores_a_losing_count_ever_more_rarely():
    from lensbench.gpu.threads import Adaptive

    policy = Adaptive(2, explore=4, backoff=8, first=1)
    picks = []
    for _ in range(80):
        n = policy.choose()
        picks.append(n)
        policy.record(n, 1.0 if n == 1 else 20.0)  # 2 threads 20x slower, as beside another process
    twos = [i for i, n in enumerate(picks) if n == 2]
    assert twos == [1, 3, 7, 15, 31, 63]  # the first look, then explorations 4, 8, 16 and 32 steps apart
    fixed = Adaptive(2, explore=4)  # without backoff, every 4 steps
    for _ in range(80):
        n = fixed.choose()
        fixed.record(n, 1.0 if n == 1 else 20.0)
        picks.append(n)
    assert picks[80:].count(2) > len(twos) * 2


def test_a_two_column_case_solved_by_hand():
    """H couples inputs 0 and 1 with correlation rho; everything else is independent. The optimal update of
    w1 after rounding w0 to q0 is w1 + rho (w0 - q0) (H⁻¹'s Cholesky factor), and then w1 is rounded."""
    rho = 0.6
    h = torch.eye(8, dtype=torch.float64)
    h[0, 1] = h[1, 0] = rho
    w = torch.tensor([[0.37, -0.21, 0.9, -1.0, 0.5, 0.05, -0.6, 0.8]])
    r = gptq_weight(w, h, 2, 8, False, GPTQConfig(damp=0.0, act_order=False, clip=False))
    s, m = grid(w, 2, False)  # the group's grid is fitted before any update (column 0 starts it)
    q0 = dequantized(round_to_grid(w[:, :1], s, m, 2), s, m)[0, 0]
    w1 = w[0, 1] + rho * (w[0, 0] - q0)
    q1 = dequantized(round_to_grid(w1.reshape(1, 1), s, m, 2), s, m)[0, 0]
    got = dequantize(r.packed)[0]
    assert got[0] == pytest.approx(float(q0)) and got[1] == pytest.approx(float(q1))
    rest = dequantized(round_to_grid(w[:, 2:], s, m, 2), s, m)[0]  # independent columns: plain rounding
    assert torch.allclose(got[2:], rest)


def test_a_diagonal_hessian_makes_gptq_round_to_nearest():
    w, _ = problem(k=64)
    h = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)
    r = gptq_weight(w, h, 4, 32, False, GPTQConfig(clip=False))
    assert r.error == pytest.approx(r.rtn_error, rel=1e-9)
    clipped = gptq_weight(w, h, 4, 32, False)  # the default searches each group's range: rounding on that grid
    parts = []
    for a in (0, 32):
        s, m = clipped_grid(w[:, a:a + 32], 4, False, torch.diag(h)[a:a + 32])
        parts.append(dequantized(round_to_grid(w[:, a:a + 32], s, m, 4), s, m))
    rtn = torch.cat(parts, 1)
    assert torch.allclose(dequantize(clipped.packed), rtn)
    assert clipped.error < r.error


def test_the_clipped_grid_is_never_worse_and_clips_an_outlier():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    w[:, 5] *= 8  # one outlier column: min-max spends the grid on it
    weight = torch.rand(128, generator=g) + 0.1
    weight[5] = 0.01  # ... although it hardly matters to the layer's output

    def error(s, m):
        return ((dequantized(round_to_grid(w, s, m, 3), s, m) - w) ** 2) @ weight

    plain, clipped = error(*grid(w, 3)), error(*clipped_grid(w, 3, importance=weight))
    assert (clipped <= plain).all()
    assert clipped.sum() < 0.5 * plain.sum()
    s, _ = clipped_grid(w[:, :0], 3)
    assert s.shape == (64,)


def test_act_order_keeps_the_layout_and_still_beats_rtn():
    w, h = problem(k=128)
    r = gptq_weight(w, h, 3, 32, False, GPTQConfig(act_order=True))
    assert r.packed.shape == (24, 128) and r.packed.n_groups == 4
    assert r.error < r.rtn_error


def test_too_few_tokens_are_dampened_and_reported():
    w, _ = problem(k=64)
    x = torch.randn(3, 64, dtype=torch.float64)  # rank 3: singular without dampening
    r = gptq_weight(w, 2 * x.T @ x / 3, 4, 32, False)
    assert r.damp >= 0.01 and torch.isfinite(dequantize(r.packed)).all()


def test_nan_weights_are_refused():
    w, h = problem()
    w[3, 5] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        gptq_weight(w, h, 4, 32)


def _int3_plan(model, method="gptq", scheme="asym"):
    block = model_card(model)["units"]["block"]
    return Plan.quantize(model_card(model), {block.format(i=i): Quant(3, 16, scheme, method)
                                             for i in range(model.n_layers)})


def test_sequential_gptq_beats_rtn_on_every_linear_and_leaves_the_model_dense(tiny):
    model = tiny("llama")
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    targets = _int3_plan(model).quant_targets(model)
    results = quantize_model(model, targets, list(SAMPLE_TEXTS), GPTQConfig(batch_size=4, seq_len=64))
    assert set(results) == set(targets) and len(results) == model.n_layers * len(block_linears(model))
    for name, r in results.items():
        assert r.error <= r.rtn_error * (1 + 1e-9), name
    assert all(torch.equal(p, before[n]) for n, p in model.module.named_parameters())


def test_a_gptq_plan_runs_after_prepare_and_is_refused_before(tiny):
    model = tiny("llama")
    plan = _int3_plan(model)
    with pytest.raises(PlanError, match="calibration text"):
        with apply(model, plan):
            pass
    summary = prepare(model, plan.bind(model), list(SAMPLE_TEXTS), GPTQConfig(batch_size=4, seq_len=64))
    assert summary["layers"] == model.n_layers * len(block_linears(model)) and summary["layer_error_vs_rtn"] < 1
    batch = model.tokenize(list(SAMPLE_TEXTS)[:2])
    with torch.no_grad():
        with apply(model, plan):
            gptq = model.module(**batch.model_inputs()).logits
        with apply(model, plan.with_method("rtn")):
            rtn = model.module(**batch.model_inputs()).logits
    assert not torch.allclose(gptq, rtn)


def test_the_method_is_recorded_in_the_plan_and_read_back(tmp_path, tiny):
    model = tiny("llama")
    plan = _int3_plan(model, scheme="sym")
    path = plan.save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["actions"]["model.layers.0"] == {"op": "quant", "bits": 3, "group_size": 16, "scheme": "sym",
                                                "method": "gptq"}
    assert Plan.load(path).actions == plan.actions
    rtn = plan.with_method("rtn").to_dict()["actions"]["model.layers.0"]
    assert "method" not in rtn  # an RTN plan's JSON is what it always was


# --- GPTQ onto llama.cpp's GGML grids ------------------------------------------------------------------------
GGML_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q3_K", "Q4_K"])
def test_gptq_on_a_ggml_grid_matches_the_column_by_column_reference(qtype):
    w, h = problem(n=8, k=256)
    fast = gptq_ggml(w, h, qtype, GPTQConfig(block=64, act_order=False)).packed.dequantize().double()
    slow = reference_gptq(w, h, 0, 0, False, 0.01, ggml_grid=ggml.fit(w.numpy(), qtype))
    assert torch.isclose(fast, slow, atol=1e-4).float().mean() > 0.995
    assert layer_error(w, fast, h) == pytest.approx(layer_error(w, slow, h), rel=1e-3)


@pytest.mark.parametrize("qtype", GGML_TYPES)
def test_gptq_on_ggml_grids_beats_llama_cpps_rounding_with_its_scales(qtype):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    w, h = problem(n=8, k=256)
    r = gptq_ggml(w, h, qtype)
    assert r.error < r.rtn_error  # rtn_error: gguf's own quantiser (llama.cpp's reference rounding)
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    assert r.packed.data.shape == (8, 256 // block * nbytes) and r.packed.data.dtype == np.uint8
    # the bytes are what gguf's reader decodes to the values GPTQ computed with
    back = quants.dequantize(r.packed.data, GGMLQuantizationType[qtype])
    assert np.array_equal(back, r.packed.dequantize().numpy())
    # a 32-value type's float16 scale is the one llama.cpp's quantiser writes (the grid is fitted to the original
    # weights): only the codes differ (a K-quant's grid: the diagonal-Hessian test below)
    if not qtype.endswith("_K"):
        ref = ggml.quantize(w.numpy(), qtype).reshape(-1, nbytes)[:, :2]
        assert np.array_equal(r.packed.data.reshape(-1, nbytes)[:, :2], ref)


def test_a_diagonal_hessian_makes_gptq_on_a_ggml_grid_round_to_nearest():
    """No coupling between inputs: GPTQ has nothing to compensate, and its bytes are the K-quant quantiser's."""
    w, _ = problem(k=256)
    h = torch.diag(torch.rand(256, dtype=torch.float64) + 0.5)
    r = gptq_ggml(w, h, "Q4_K")
    assert np.array_equal(r.packed.data, ggml.quantize(w.numpy(), "Q4_K"))


def test_gptq_on_a_ggml_grid_refuses_bad_input():
    w, h = problem(k=96)
    with pytest.raises(QuantError, match="multiples of 256"):
        gptq_ggml(w, h, "Q4_K")
    w[0, 0] = float("inf")
    with pytest.raises(QuantError, match="NaN or Inf"):
        gptq_ggml(w, h, "Q4_0")


def test_outside_blocks_are_refused(tiny):
    with pytest.raises(QuantError, match="method 'obq' is not known"):
        Quant(4, 32, "asym", "obq")
    model = tiny("llama")
    with pytest.raises(LensbenchError, match="outside them"):
        quantize_model(model, {"lm_head": Quant(4, 16, method="gptq")}, list(SAMPLE_TEXTS))


def test_bit_policies_write_the_method(tiny):
    from lensbench.compress.policies import make_plan
    from lensbench.profiling import profile_model

    model = tiny("llama")
    prof = profile_model(model, list(SAMPLE_TEXTS), analyses=["redundancy", "quant_sensitivity"],
                         analysis_params={"quant_sensitivity": {"bits": (2, 4), "group_size": 16}},
                         progress=False, seq_len=32)
    plan = make_plan("bits-rank", prof, 3.0, levels="4,2", group_size=16, method="gptq")
    assert {q.method for q in plan.quant_actions().values()} == {"gptq"}
    assert plan.policy["method"] == "gptq"


def test_a_gptq_checkpoint_loads_in_transformers_with_the_gptq_logits(tiny, tmp_path):
    """compressed-tensors stores GPTQ's codes and scales: transformers (in a process without lensbench)
    computes what the in-memory GPTQ plan computes."""
    from lensbench.compress.save import compress
    from test_compress import HF_LOAD, consume, ids_for, planned_logits

    model = tiny("llama")
    plan = _int3_plan(model, scheme="sym")
    saved = compress(model, plan, format="compressed-tensors", out=tmp_path / "ck", calibration=list(SAMPLE_TEXTS))
    assert saved.record["plan"]["actions"]["model.layers.0"]["method"] == "gptq"
    ids = ids_for(model)
    got = consume(tmp_path, HF_LOAD.format(path=str(tmp_path / "ck")), ids)
    want = planned_logits(model, plan, ids)  # the cached GPTQ weights compress computed
    with torch.no_grad(), apply(model, plan.with_method("rtn")):
        rtn = model.module(ids).logits.numpy()
    assert abs(got - want).max() <= 1e-3 < abs(got - rtn).max()


def test_a_gptq_gguf_file_loads_in_transformers_and_llama_cpp_with_the_gptq_logits(tiny, tmp_path):
    """GPTQ onto the GGML grids, saved as GGUF: transformers' reader (a process without lensbench) computes what
    the in-memory GPTQ plan computes, which is not what llama.cpp's own rounding gives; llama.cpp runs it."""
    from lensbench.compress.save import compress
    from test_compress import HF_GGUF_CHECK, consume, ids_for, llama_cpp_runs, planned_logits

    model = tiny("llama")
    block = model_card(model)["units"]["block"]
    plan = Plan.quantize(model_card(model), {block.format(i=i): Quant(4, scheme="gguf", method="gptq")
                                             for i in range(model.n_layers)})
    saved = compress(model, plan, format="gguf", out=tmp_path / "ck", calibration=list(SAMPLE_TEXTS))
    assert saved.record["tensor_types"]["Q4_0"] == model.n_layers * len(block_linears(model))  # 32 inputs: Q4_0
    ids = ids_for(model, n=1)
    want = planned_logits(model, plan, ids)[0]
    with torch.no_grad(), apply(model, plan.with_method("rtn")):
        rtn = model.module(ids).logits[0].numpy()
    hf, cpp = consume(tmp_path, HF_GGUF_CHECK.format(dir=str(saved.path), file=saved.record["file"],
                                                     use_llama=llama_cpp_runs() is None), ids)
    assert np.abs(hf - want).max() <= 1e-4 < np.abs(hf - rtn).max()
    if np.isnan(cpp).all():
        pytest.skip(f"{llama_cpp_runs()}; transformers' reader checked")
    # llama.cpp rounds activations to 8 bits for its quantised matmuls: close, the same greedy tokens
    assert np.abs(cpp - want).max() <= 0.05 and (cpp.argmax(-1) == want.argmax(-1)).all()
