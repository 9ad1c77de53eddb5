"""Relevance of a model's prediction (tokens, layer × token, sublayers, heads), faithfulness metrics,
the Profile scores and the `lensbench relevance` command, on tiny models."""
import json

import numpy as np
import pytest
import torch

from lensbench.analyses.lrp import LRPConfig, LRPError
from lensbench.analyses.lrp.attribute import attribute, unit_scores
from lensbench.analyses.lrp.faithfulness import (Curves, deletion_curves, gradient_x_input, integrated_gradients,
                                                 random_scores)
from lensbench.cli import main

TEXT = "The city council approved the new budget"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "bert"])
def test_relevance_shapes_and_conservation(tiny, arch):
    model = tiny(arch)
    rel = attribute(model, TEXT, cfg=LRPConfig(attn_lrp=False))
    S, L, H = len(rel.tokens), model.n_layers, model.adapter.n_heads
    assert rel.scores.shape == (S,) and rel.layer_tokens.shape == (L, S) and rel.heads.shape == (L, H)
    c = rel.conservation
    assert c["coverage"] == 1.0 and c["end_to_end_error"] < 1e-3
    # identity softmax: everything reaches the embeddings (word + position/type), minus what biases keep
    total = rel.scores.sum() + rel.other_inputs.sum() + sum(c["absorbed"].values())
    assert total == pytest.approx(rel.start, rel=1e-3, abs=1e-4)
    if model.is_causal_lm:  # the last block's output carries the whole start (only the norm and head follow)
        assert rel.layer_tokens[-1].sum() == pytest.approx(rel.start, rel=1e-3, abs=1e-4)
    assert "Relevance(" in repr(rel) and rel.target


def test_heads_add_up_to_the_attention_output(tiny):
    """Llama's o_proj has no bias: the relevance entering it per head sums to what leaves the attention."""
    model = tiny("llama")
    rel = attribute(model, TEXT)
    np.testing.assert_allclose(rel.heads.sum(1), rel.attn, rtol=1e-3, atol=1e-5)


def test_target_contrast_and_one_start(tiny):
    model = tiny("llama")
    with torch.no_grad():
        logits = model.module(**model.tokenize([TEXT]).model_inputs()).logits[0, -1]
    a, b = int(logits.argsort()[-1]), int(logits.argsort()[-2])
    rel = attribute(model, TEXT, target=a, contrast=b)
    assert rel.start == pytest.approx(float(logits[a] - logits[b]), rel=1e-4)
    one = attribute(model, TEXT, target=a, start="one", cfg=LRPConfig(attn_lrp=False))
    assert one.scores.sum() + one.other_inputs.sum() + sum(one.conservation["absorbed"].values()) == \
        pytest.approx(1.0, rel=1e-3)


def test_encoder_target_is_an_embedding_dimension(tiny):
    rel = attribute(tiny("bert"), TEXT, target=3)
    assert rel.target == "embedding dim 3" and rel.conservation["coverage"] == 1.0


def test_bad_targets_are_refused(tiny):
    model = tiny("llama")
    with pytest.raises(LRPError, match="outside the vocabulary"):
        attribute(model, TEXT, target=10**6)
    with pytest.raises(LRPError, match="tokens .* not one"):
        attribute(model, TEXT, target="unbelievably approved")
    with pytest.raises(LRPError, match="non-empty"):
        attribute(model, "  ")
    with pytest.raises(LRPError, match="contrast needs a causal LM"):
        attribute(tiny("bert"), TEXT, contrast=3)


def test_plots(tiny):
    rel = attribute(tiny("llama"), TEXT)
    tokens, layers = rel.plot(), rel.plot("layers")
    assert tokens.data[0].type == "heatmap" and len(tokens.data[0].x) == len(rel.tokens)
    assert len(layers.data[0].y) == tiny("llama").n_layers + 1
    with pytest.raises(ValueError):
        rel.plot("pie")


def test_unit_scores_rank_layers(tiny):
    model = tiny("llama")
    rels = [attribute(model, t) for t in (TEXT, "Shares rose sharply on Monday")]
    scores = {s.name: s for s in unit_scores(rels)}
    assert set(scores) == {"relevance_block", "relevance_attn", "relevance_mlp", "relevance_heads"}
    assert len(scores["relevance_block"].ranking()) == model.n_layers
    np.testing.assert_allclose(scores["relevance_block"].values,
                               scores["relevance_attn"].values + scores["relevance_mlp"].values)


def test_deletion_curves_and_abpc(tiny):
    model = tiny("llama")
    ids = model.tokenize([TEXT]).input_ids[0]
    target = int(model.module(ids[None]).logits[0, -1].argmax())
    rel = attribute(model, TEXT, target=target)
    curves = deletion_curves(model, ids, rel.scores, target)
    n = sum(t not in model.tokenizer.all_special_ids for t in ids.tolist())  # special tokens are never masked
    assert len(curves.morf) == len(curves.lerf) == n + 1
    assert curves.morf[0] == curves.lerf[0] == pytest.approx(curves.p0)
    assert curves.morf[-1] == pytest.approx(curves.lerf[-1], rel=1e-4)  # all masked either way
    s = curves.summary()
    assert s["abpc"] == pytest.approx(s["sufficiency"] * -1 + s["comprehensiveness"], abs=1e-9)
    # a ranking and its reverse swap MoRF and LeRF: ABPC flips sign
    flipped = deletion_curves(model, ids, -rel.scores, target)
    assert flipped.abpc == pytest.approx(-curves.abpc, abs=1e-6)


def test_curves_auc_by_trapezoid():
    c = Curves(morf=np.array([1.0, 0.0]), lerf=np.array([1.0, 1.0]), p0=1.0)
    assert c.abpc == pytest.approx(0.5)


def test_gradient_x_input_and_integrated_gradients_completeness(tiny):
    from lensbench.analyses.lrp.faithfulness import mask_token

    model = tiny("llama")
    ids = model.tokenize([TEXT]).input_ids[0]
    target = 7
    base_ids = torch.where(torch.tensor([t in model.tokenizer.all_special_ids for t in ids.tolist()]), ids,
                           torch.tensor(mask_token(model)))
    embed = model.module.get_input_embeddings()
    emb = embed(ids[None]).detach()
    with torch.no_grad():
        f_x = float(model.module(inputs_embeds=emb).logits[0, -1, target])
        f_0 = float(model.module(inputs_embeds=embed(base_ids[None])).logits[0, -1, target])
    ig = integrated_gradients(model, ids, target, steps=64)
    assert ig.sum() == pytest.approx(f_x - f_0, rel=0.02, abs=1e-3)
    gxi = gradient_x_input(model, ids, target)
    e = emb.clone().requires_grad_(True)
    model.module(inputs_embeds=e).logits[0, -1, target].backward()
    np.testing.assert_allclose(gxi, (e.grad * emb).sum(-1)[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(random_scores(ids, 0), random_scores(ids, 1))


def test_relevance_command(capsys, tmp_path, tiny_dir):
    out = tmp_path / "rel"
    code = main(["relevance", str(tiny_dir("llama")), "--text", TEXT, "--text", "Shares rose", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rels = json.loads((out / "relevance.json").read_text())
    assert len(rels) == 2 and rels[0]["conservation"]["coverage"] == 1.0
    html = (out / "relevance.html").read_text()
    assert "plotly" in html and "end-to-end conservation error" in html
    prof = json.loads((out / "profile.json").read_text())
    assert "relevance_block" in json.dumps(prof)
    assert "Relevance(" in captured.out


def test_relevance_command_bad_target(capsys, tmp_path, tiny_dir):
    code = main(["relevance", str(tiny_dir("llama")), "--text", TEXT, "--target", "unbelievably approved",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not one" in err
