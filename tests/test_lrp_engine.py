"""DynamicLRP engine: hand-derived rules on small networks, promises, conservation and node coverage on
many architectures (no model-specific code), agreement with LXT's explicit AttnLRP rules, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from lensbench.analyses.lrp import LRPConfig, LRPError, Rule, RULES, propagate, register_rule
from lensbench.testing import ENCODER_DECODERS, TINY_ARCHS, more_tiny_hf_models, tiny_hf_model

EPS = LRPConfig(eps=1e-12, attn_lrp=False)


def sink_relevance(report):
    """Relevance that reached the input leaf (the only AccumulateGrad marked as input)."""
    (r,) = [v for (name, _), v in report.sinks.items() if name == "AccumulateGrad"]
    return r


def test_linear_epsilon_rule_matches_hand_derivation():
    torch.manual_seed(0)
    x, W, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
    xin = x.clone().requires_grad_(True)
    with torch.enable_grad():
        z = F.linear(xin, W, b.clone().requires_grad_(True))  # a parameter: its value is in the graph
    R = torch.randn(3, 4)
    report, _ = propagate(z, R, EPS, inputs=[xin])
    expected = (x[:, :, None] * W.t()[None] * (R / z.detach())[:, None, :]).sum(-1)  # x_i W_ji R_j / z_j
    torch.testing.assert_close(sink_relevance(report), expected.sum(-1), rtol=1e-5, atol=1e-5)
    bias_share = float((b * R / z.detach()).sum())
    assert report.absorbed["bias"] == pytest.approx(bias_share, rel=1e-4, abs=1e-5)
    assert report.end_to_end_error < 1e-5


def test_layernorm_is_identity_and_promises_rebuild_add_operands():
    torch.manual_seed(1)
    x = torch.randn(2, 6).requires_grad_(True)
    W1, W2 = torch.randn(6, 6), torch.randn(6, 6)
    with torch.enable_grad():
        a, b = x @ W1, x @ W2  # the Add below saves neither operand: a promise rebuilds both
        h = F.layer_norm(a + b, (6,))
    R = torch.randn(2, 6)
    report, watched = propagate(h, R, EPS, inputs=[x], watch=[(h.grad_fn, 0)])
    assert report.replays >= 1
    # identity through the norm, then R_a = |a| / (|a| + |b|) R, then the ε-rule of each product
    a, b = a.detach(), b.detach()
    Ra, Rb = a.abs() / (a.abs() + b.abs()) * R, b.abs() / (a.abs() + b.abs()) * R
    expected = (x.detach() * ((Ra / a) @ W1.t() + (Rb / b) @ W2.t())).sum(-1)
    torch.testing.assert_close(sink_relevance(report), expected, rtol=1e-4, atol=1e-5)
    assert report.end_to_end_error < 1e-5


def _attention(x, Wq, Wk, Wv, ops, scale=True):
    q, k, v = ops["linear"](x, Wq), ops["linear"](x, Wk), ops["linear"](x, Wv)
    scores = ops["matmul"](q, k.transpose(-1, -2))
    A = ops["softmax"](scores / math.sqrt(q.shape[-1]) if scale else scores, -1)
    return ops["matmul"](A, v)


def test_attention_rules_match_hand_derivation():
    """A·V and QKᵀ split uniformly (halves), softmax by AttnLRP: R_x = x ⊙ (R − s ΣR)."""
    torch.manual_seed(2)
    x = torch.randn(4, 3).requires_grad_(True)
    Wq, Wk, Wv = (torch.randn(3, 3) for _ in range(3))
    torch_ops = {"linear": F.linear, "softmax": torch.softmax, "matmul": torch.matmul}
    with torch.enable_grad():
        out = _attention(x, Wq, Wk, Wv, torch_ops)
    R = torch.randn(4, 3)
    cfg = LRPConfig(eps=1e-12, attn_lrp=True)
    report, _ = propagate(out, R, cfg, inputs=[x])
    xd = x.detach()
    q, k, v = xd @ Wq.t(), xd @ Wk.t(), xd @ Wv.t()
    S = q @ k.t() / math.sqrt(3)
    A = torch.softmax(S, -1)
    z = A @ v
    s = R / z
    Rv = 0.5 * v * (A.t() @ s)
    RA = 0.5 * A * (s @ v.t())
    RS = S * (RA - A * RA.sum(-1, keepdim=True))
    t = RS / (q @ k.t())  # the ε-rule's z is the product itself; the 1/√d scaling passes R unchanged
    Rq, Rk = 0.5 * q * (t @ k), 0.5 * k * (t.t() @ q)
    expected = sum((xd * ((Rp / p) @ W)).sum(-1) for Rp, p, W in ((Rq, q, Wq), (Rk, k, Wk), (Rv, v, Wv)))
    torch.testing.assert_close(sink_relevance(report), expected, rtol=1e-4, atol=1e-4)
    assert report.absorbed["softmax"] == pytest.approx(float(RA.sum() - RS.sum()), rel=1e-4, abs=1e-5)


def test_agrees_with_lxt_explicit_attnlrp_rules():
    """LXT (the AttnLRP authors' code, explicit mode: relevance as the backward of custom functions) on the
    same attention + output projection; our engine walks the plain-torch graph. (LXT's explicit mode needs
    every operation wrapped, so the 1/√d scaling is folded into W_q.)"""
    lxt = pytest.importorskip("lxt.explicit.functional")
    torch.manual_seed(3)
    x0 = torch.randn(5, 4)
    Wq, Wk, Wv, Wo = (torch.randn(4, 4) for _ in range(4))
    Wq = Wq / 2.0
    bo = torch.randn(4)
    lxt_ops = {"linear": lambda a, w: lxt.linear_epsilon(a, w, None, 1e-12),
               "softmax": lambda a, d: lxt.softmax(a, d),
               "matmul": lambda a, b: lxt.matmul(a, b, epsilon=1e-12)}
    R = torch.randn(5, 4)
    x = x0.clone().requires_grad_(True)
    y = lxt.linear_epsilon(_attention(x, Wq, Wk, Wv, lxt_ops, scale=False), Wo, bo, 1e-12)
    y.backward(R)
    reference = (x.grad).sum(-1)
    xin = x0.clone().requires_grad_(True)
    with torch.enable_grad():
        torch_ops = {"linear": F.linear, "softmax": torch.softmax, "matmul": torch.matmul}
        out = F.linear(_attention(xin, Wq, Wk, Wv, torch_ops, scale=False), Wo, bo.clone().requires_grad_(True))
    report, _ = propagate(out, R, LRPConfig(eps=1e-12, attn_lrp=True), inputs=[xin])
    torch.testing.assert_close(sink_relevance(report), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_coverage_and_conservation_on_tiny_architectures(arch, attn):
    try:
        model = tiny_hf_model(arch, attn=attn)
    except ValueError:
        pytest.skip(f"{arch} has no {attn} attention")
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 17]])
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        out = model(ids)
    y = out.logits[0, -1].max() if hasattr(out, "logits") else out.last_hidden_state[0, 0, :4].abs().sum()
    for cfg in (LRPConfig(attn_lrp=False), LRPConfig(attn_lrp=True)):
        report, _ = propagate(y, cfg=cfg)  # strict: raises if any operation lacks a rule
        assert report.coverage == 1.0 and not report.uncovered
        assert report.end_to_end_error < 1e-3
        assert max(report.op_error.values()) < 1e-3
    assert abs(report.sink_total) > 0


@pytest.mark.parametrize("name", ["t5", "bart", "opt", "falcon", "bloom", "distilbert"])
def test_coverage_on_more_architectures_including_encoder_decoders(name):
    torch.manual_seed(0)
    model = more_tiny_hf_models()[name]().eval()
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    kw = {"decoder_input_ids": torch.tensor([[0, 4, 6]])} if name in ENCODER_DECODERS else {}
    with torch.enable_grad():
        out = model(ids, **kw)
    y = out.logits[0, -1].max() if hasattr(out, "logits") else out.last_hidden_state[0, 0, :4].abs().sum()
    report, _ = propagate(y, cfg=LRPConfig(attn_lrp=False))
    assert report.coverage == 1.0
    assert report.end_to_end_error < 1e-3
    if name in ENCODER_DECODERS:  # relevance reaches both the encoder's and the decoder's token embeddings
        assert len(report.sinks) >= 2


def test_eager_and_fused_attention_give_the_same_relevance(tiny):
    from lensbench.analyses.lrp.attribute import attribute
    from lensbench.testing import tiny_model

    cfg = LRPConfig(attn_lrp=False)
    eager = attribute(tiny_model("llama", attn="eager"), "The city council approved the budget", cfg=cfg)
    fused = attribute(tiny_model("llama", attn="sdpa"), "The city council approved the budget", cfg=cfg)
    assert eager.target_id == fused.target_id
    torch.testing.assert_close(torch.tensor(eager.scores), torch.tensor(fused.scores), rtol=1e-3, atol=1e-5)


def test_cp_lrp_is_the_same_on_eager_and_fused_attention():
    from lensbench.analyses.lrp.attribute import attribute
    from lensbench.testing import tiny_model

    cfg = LRPConfig(cp_lrp=True)
    eager = attribute(tiny_model("llama", attn="eager"), "The city council approved the budget", cfg=cfg)
    fused = attribute(tiny_model("llama", attn="sdpa"), "The city council approved the budget", cfg=cfg)
    torch.testing.assert_close(torch.tensor(eager.scores), torch.tensor(fused.scores), rtol=1e-3, atol=1e-5)


def test_output_without_graph_is_refused():
    with pytest.raises(LRPError, match="no autograd graph"):
        propagate(torch.randn(3))


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_unsupported_operation_is_named_with_how_to_register():
    x = torch.randn(4).requires_grad_(True)
    with torch.enable_grad():
        y = _Twice.apply(x).sum()
    with pytest.raises(LRPError, match=r"_TwiceBackward.*register_rule\('_TwiceBackward'"):
        propagate(y, inputs=[x])
    report, _ = propagate(y, cfg=LRPConfig(strict=False), inputs=[x])  # lenient: listed, relevance absorbed
    assert report.uncovered == {"_TwiceBackward": 1} and report.coverage < 1.0
    try:
        register_rule("_TwiceBackward", Rule(lambda ctx, node, R: [R[0]], doc="identity"))
        report, _ = propagate(y, inputs=[x])
        assert report.coverage == 1.0 and report.end_to_end_error < 1e-6
    finally:
        RULES.pop("_TwiceBackward", None)


def test_rule_table_lists_at_least_the_papers_47_operations():
    from lensbench.analyses.lrp.rules import rule_table

    table = rule_table()
    assert len(table) >= 47 and all(doc for _, doc in table)


def test_bad_config_is_refused():
    with pytest.raises(LRPError, match="bilinear"):
        LRPConfig(bilinear="half")


def test_reindexing_forwards_rebuild_unsaved_values():
    torch.manual_seed(2)
    x = torch.randn(4, 6).requires_grad_(True)
    idx = torch.tensor([3, 0, 2])
    W = torch.randn(6, 6)
    with torch.enable_grad():
        h = x @ W
        a = h.index_select(0, idx)  # the Add below saves neither operand: promises replay these re-indexings
        b = h.t().unsqueeze(0).permute(0, 2, 1).reshape(4, 6)[idx]
        out = a + b
    report, _ = propagate(out, torch.randn(3, 6), EPS, inputs=[x])
    assert report.unresolved == {} and report.replays >= 2
    assert report.end_to_end_error < 1e-5
