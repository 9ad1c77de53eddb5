"""Quantisation sensitivity equals the naive measurement (full forwards with one unit quantised), the
simulated quantisation computes what the packed model computes, and ZD matches its definition."""
import numpy as np
import pytest
import torch

from lensbench.gpu import cpu_kernels
from lensbench.analyses import make
from lensbench.compress.apply import apply
from lensbench.capture import batches
from lensbench.compress.plan import Plan
from lensbench.profiling import model_card, profile_model
from lensbench.simquant import block_linears, simulated


def naive_block_kl(model, texts, layer, bits, gs):
    """Mean KL(dense || quantised block) over scored tokens with full forwards."""
    total, n = 0.0, 0
    block = model.adapter.block_path(layer)
    targets = {f"{block}.{name}": (bits, gs) for name in block_linears(model)}
    for batch in batches(model, texts, 4, 32):
        inputs, mask = batch.model_inputs(), batch.content_mask
        with torch.no_grad():
            logp = torch.log_softmax(model.module(**inputs).logits[mask].double(), -1)
            with simulated(model, targets):
                logq = torch.log_softmax(model.module(**inputs).logits[mask].double(), -1)
        total += float((logp.exp() * (logp - logq)).sum())
        n += int(mask.sum())
    return total / n


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_sensitivity_equals_naive_full_forwards(tiny64, texts, arch):
    model = tiny64(arch)
    prof = profile_model(model, texts, analyses=["quant_sensitivity"], batch_size=4, seq_len=32, progress=False,
                         analysis_params={"quant_sensitivity": {"bits": (2, 8), "group_size": 32,
                                                                           "per_linear": True}})
    kl2 = prof.scores["quant_kl_block_int2"].values
    kl8 = prof.scores["quant_kl_block_int8"].values
    for layer in range(model.n_layers):
        # float64 on both sides; the replayed prefix states pass through float32 capture storage, whose
        # rounding (6e-8 relative) is what the 1e-6 tolerance leaves room for
        assert kl2[layer] == pytest.approx(naive_block_kl(model, texts, layer, 2, 32), rel=1e-6, abs=1e-12)
    assert (kl8 < kl2).all()  # 8 bits hurt less than 2
    lin = prof.scores["quant_kl_linear_int2"]
    assert lin.values.shape == (model.n_layers, len(block_linears(model))) and lin.axes == ("layer", "linear")
    assert (lin.values > -1e-6).all() and (lin.values.sum(1) > 0).all()  # KL >= 0 up to float error


def test_simulated_quantisation_computes_what_the_packed_model_computes(tiny):
    model = tiny("llama")
    card = model_card(model)
    plan = Plan.quantize(card, {card["units"]["block"].format(i=i): (3, 32) for i in range(model.n_layers)})
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), apply(model, plan), cpu_kernels.exact_kernels():  # float32 tiles, as simulated
        packed = model.module(input_ids=ids).logits
    with torch.no_grad(), simulated(model, plan.quant_targets(model)):
        sim = model.module(input_ids=ids).logits
    assert torch.allclose(packed, sim, atol=1e-4, rtol=1e-4)
    dense = model.module(input_ids=ids).logits
    assert not torch.allclose(dense, sim, atol=1e-4)  # and the weights are back afterwards:
    with torch.no_grad():
        assert torch.equal(model.module(input_ids=ids).logits, dense)


def test_zd_is_the_fraction_beyond_one_std(tiny):
    model = tiny("llama")
    a = make("weight_outliers")
    a.start(model)
    (zd,) = a.finish()
    assert zd.higher_is_more_important is False and zd.values.shape == (model.n_layers,)
    blk = model.adapter.blocks[1]
    fr = []
    for name in block_linears(model):
        w = blk.get_submodule(name).weight.detach().double().numpy().ravel()
        fr.append(np.mean(np.abs((w - w.mean()) / w.std(ddof=1)) > 1))
    assert zd.values[1] == pytest.approx(np.mean(fr), abs=1e-6)
