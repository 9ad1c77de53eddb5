"""Evaluation of a plan against the dense model, and the plan/evaluate commands end to end."""
import json

import pytest
import torch

from lensbench.surgery import apply_units, weight_bytes
from lensbench.cli import main
from lensbench.compress.evaluate import EvalConfig, evaluate
from lensbench.scoring import continuation_logprob
from lensbench.compress.plan import Plan
from lensbench.units import Unit
from lensbench.probes.cities import city_facts
from lensbench.profiling import model_card
from lensbench.testing import SAMPLE_TEXTS

FAST = EvalConfig(cities=6, topics=5, speed_rounds=1, decode_tokens=2, prompt_tokens=16)


def test_city_facts_are_real_and_balanced():
    facts = city_facts(limit=50)
    assert len(facts) == 50 and len({f["city"] for f in facts}) == 50
    assert all(f["true"] != f["false"] and f["prefix"].startswith("The city of ") for f in facts)
    tokyo = [f for f in city_facts(limit=400) if f["city"] == "Tokyo"]
    assert not tokyo or tokyo[0]["true"] == " Japan"
    assert city_facts(limit=20, seed=3) != city_facts(limit=20, seed=4)  # wrong countries are drawn by seed


def test_continuation_logprob_matches_a_plain_forward(tiny):
    model = tiny("llama")
    lp = continuation_logprob(model, ["The city of Paris is in", "A"], [" France", " b c"], batch_size=1)
    tok = model.tokenizer
    a, b = tok("The city of Paris is in")["input_ids"], tok(" France", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model.module(input_ids=torch.tensor([a + b])).logits[0].float(), -1)
    want = sum(float(logp[len(a) + j - 1, t]) for j, t in enumerate(b))
    assert float(lp[0]) == pytest.approx(want, abs=1e-4)
    assert torch.allclose(lp, continuation_logprob(model, ["The city of Paris is in", "A"], [" France", " b c"]),
                          atol=1e-4)  # padding in a batch changes nothing


def test_empty_plan_is_the_dense_model(tiny):
    model = tiny("llama")
    r = evaluate(model, Plan.drop(model_card(model), []), FAST, texts=SAMPLE_TEXTS)
    assert r["kl_to_dense"] == pytest.approx(0, abs=1e-6)
    assert r["perplexity"] == pytest.approx(r["dense_perplexity"], rel=1e-5)
    assert r["city_accuracy"] == r["dense_city_accuracy"] and r["weight_bytes"] == r["dense_weight_bytes"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_plan_quality_is_measured_with_full_forwards(tiny64, arch):
    model = tiny64(arch)  # float64: the KL is compared with an independent computation of it
    units = [Unit(0, "attn"), Unit(2, "block")]
    r = evaluate(model, Plan.drop(model_card(model), units), FAST, texts=SAMPLE_TEXTS)
    batch = model.tokenize(SAMPLE_TEXTS, max_length=128)
    with torch.no_grad():
        logp = torch.log_softmax(model.module(**batch.model_inputs()).logits[batch.content_mask].double(), -1)
        with apply_units(model, units):
            logq = torch.log_softmax(model.module(**batch.model_inputs()).logits[batch.content_mask].double(), -1)
            reduced_bytes = weight_bytes(model.module)
    assert r["kl_to_dense"] == pytest.approx(float((logp.exp() * (logp - logq)).sum(-1).mean()), rel=1e-9)
    assert r["weight_bytes"] == reduced_bytes < r["dense_weight_bytes"]
    for key in ("prefill_speed_ratio", "decode_speed_ratio", "speed_ratio", "peak_rss_bytes", "dense_city_accuracy"):
        assert r[key] > 0
    assert r["plan"]["units"] == ["attn0", "block2"] and r["speed"]["rounds"] == 1


def test_bad_plan_is_refused_before_work(tiny):
    model, other = tiny("llama"), tiny("qwen2")
    with pytest.raises(Exception, match="made for"):
        evaluate(model, Plan.drop(model_card(other), [Unit(0, "block")]), FAST)


def test_plan_and_evaluate_commands(tmp_path, tiny_dir, capsys):
    src = tiny_dir("llama")
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(SAMPLE_TEXTS))
    prof = tmp_path / "prof"
    assert main(["profile", str(src), "--out", str(prof), "--texts", str(texts), "--analyses",
                 "redundancy,ablation"]) == 0
    plan = tmp_path / "plan.json"
    assert main(["plan", str(prof), "--policy", "drop-attn", "--budget", "1", "--ranking", "ablation",
                 "--out", str(plan)]) == 0
    assert main(["plan", str(prof), "--policy", "evo", "--budget", "1", "--generations", "1",
                 "--texts", str(texts), "--out", str(tmp_path / "evo.json")]) == 0  # model found from the profile
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(src), "--plan", str(plan), "--out", str(out), "--texts", str(texts),
                 "--cities", "4", "--speed-rounds", "1", "--decode-tokens", "2"]) == 0
    doc = json.loads(out.read_text())
    assert {"kl_to_dense", "perplexity", "dense_perplexity", "speed_ratio", "weight_bytes"} <= set(doc)
    html = tmp_path / "report.html"
    assert main(["report", str(prof), "--out", str(html), "--eval", str(out)]) == 0  # the Plans section
    assert "<h2>Plans</h2>" in html.read_text() and f"{doc['kl_to_dense']:.4f}" in html.read_text()
    capsys.readouterr()
    assert main(["report", str(prof), "--out", str(html), "--eval", str(texts)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["plan", str(prof), "--policy", "drop-block", "--budget", "3", "--out", str(plan)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at most 2 of 3" in err
    assert main(["evaluate", str(src), "--plan", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
