"""Policies -> Plans: rankings read with their direction, budgets checked, iterative and evolutionary
searches scored against independent computations."""
import functools

import numpy as np
import pytest
import torch

from lensbench.surgery import apply_units
from lensbench.cli import main
from lensbench.errors import PlanError
from lensbench.compress.policies.evo import EvoConfig, evo_search, make_state, seeds_from_profile
from lensbench.compress.policies.iterative import layer_cosines
from lensbench.compress.plan import Plan
from lensbench.units import Unit
from lensbench.compress.policies import POLICIES, make_plan
from lensbench.profiling import profile_model
from lensbench.testing import SAMPLE_TEXTS, tiny_model

L = 8


@functools.lru_cache(maxsize=None)
def deep(dtype=torch.float32):
    return tiny_model("llama", n_layers=L, seed=1, dtype=dtype)


@functools.lru_cache(maxsize=None)
def deep_profile(dtype=torch.float32):
    return profile_model(deep(dtype), SAMPLE_TEXTS, analyses=("redundancy", "ablation"), progress=False)


def naive_kl(model, texts, units):
    """Mean KL(dense || reduced) per content token with full forwards of the reduced model."""
    batch = model.tokenize(texts, max_length=128)
    with torch.no_grad():
        logp = torch.log_softmax(model.module(**batch.model_inputs()).logits[batch.content_mask].double(), -1)
        with apply_units(model, units):
            logq = torch.log_softmax(model.module(**batch.model_inputs()).logits[batch.content_mask].double(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


@pytest.mark.parametrize("kind,ranking", [("attn", "redundancy"), ("mlp", "ablation"), ("block", "ablation"),
                                          ("block", "redundancy")])
def test_topk_drops_least_important_by_direction(kind, ranking):
    prof = deep_profile()
    name = {"redundancy": f"{kind}_cosine", "ablation": f"ablation_kl_{kind}"}[ranking]
    values = prof.scores[name].values
    expect = np.argsort(-values)[:3] if ranking == "redundancy" else np.argsort(values)[:3]  # cosine: highest goes
    plan = make_plan(f"drop-{kind}", prof, 3, ranking=ranking)
    assert sorted(u.layer for u in plan.units()) == sorted(expect.tolist())
    assert {u.kind for u in plan.units()} == {kind}
    assert plan.policy == {"name": f"drop-{kind}", "budget": 3, "ranking": ranking}


def test_fraction_budget_and_joint_ranking():
    prof = deep_profile()
    assert len(make_plan("drop-attn", prof, 0.25).units()) == 2
    joint = make_plan("drop-joint", prof, 4, ranking="ablation")
    scores = [(prof.scores[f"ablation_kl_{k}"].values[i], Unit(i, k)) for k in ("attn", "mlp") for i in range(L)]
    assert set(joint.units()) == {u for _, u in sorted(scores)[:4]} or any(u.kind == "block" for u in joint.units())


def test_random_ranking_is_seeded():
    prof = deep_profile()
    a, b = (make_plan("drop-attn", prof, 3, ranking="random", seed=s).units() for s in (0, 0))
    c = make_plan("drop-attn", prof, 3, ranking="random", seed=1).units()
    assert a == b and len(c) == 3


def test_balanced_skip_keeps_first_last_evenly():
    plan = make_plan("balanced-skip", deep_profile(), 1.6)  # keep round(8/1.6) = 5
    kept = sorted(set(range(L)) - {u.layer for u in plan.units()})
    assert kept == [0, 2, 4, 5, 7] and all(u.kind == "block" for u in plan.units())
    assert plan.predicted["layer_speedup"] == pytest.approx(1.6)


def test_ranking_skip_uses_ranking():
    prof = deep_profile()
    plan = make_plan("ranking-skip", prof, 2.0, ranking="ablation")
    assert sorted(u.layer for u in plan.units()) == sorted(np.argsort(prof.scores["ablation_kl_block"].values)[:4])


@pytest.mark.parametrize("policy,budget,options,match", [
    ("drop-block", 8, {}, "at most 7 of 8"),
    ("drop-attn", 9, {}, "at most 8 of 8"),
    ("drop-attn", 0, {}, "positive count"),
    ("drop-attn", 2.5, {}, "neither a whole count"),
    ("drop-attn", 0.01, {}, "removes no"),
    ("balanced-skip", 1.0, {}, "above 1"),
    ("balanced-skip", 1.01, {}, "skips no layer"),
    ("balanced-skip", 6, {}, "keeps the 2"),
    ("drop-attn", 2, {"ranking": "geometry"}, "whole layers only"),
    ("drop-block", 2, {"ranking": "geometry"}, "--analyses geometry"),
    ("drop-block", 2, {"ranking": "nope"}, "unknown ranking"),
    ("drop-block", 2, {"ranking": "score:cka"}, "descriptive"),
    ("nope", 2, {}, "unknown policy"),
    ("evo", 2, {}, "give the model"),
    ("drop-attn", 2, {"iterative": True}, "give the model"),
])
def test_budgets_and_rankings_that_cannot_be_met(policy, budget, options, match):
    with pytest.raises(PlanError, match=match):
        make_plan(policy, deep_profile(), budget, **options)


def test_policy_from_another_models_profile_is_refused(tiny):
    with pytest.raises(Exception, match="profile"):
        make_plan("evo", deep_profile(), 2, model=tiny("llama"), texts=SAMPLE_TEXTS)


def test_registry_describes_every_budget():
    names = {"drop-block", "drop-attn", "drop-mlp", "drop-joint", "balanced-skip", "ranking-skip", "evo"}
    assert names <= set(POLICIES)
    assert all(p.budget and p.description for p in POLICIES.values())


def test_iterative_redundancy_rescoring_matches_the_profile_then_reduces():
    model, prof = deep(), deep_profile()
    bs = [model.tokenize(SAMPLE_TEXTS, max_length=128)]
    cos = layer_cosines(model, bs, [])
    for kind in ("block", "attn", "mlp"):
        np.testing.assert_allclose(cos[kind], prof.scores[f"{kind}_cosine"].values, rtol=1e-4, atol=1e-6)
    plan = make_plan("drop-attn", prof, 3, model=model, texts=SAMPLE_TEXTS, iterative=True)
    trail = plan.predicted["rounds"]
    assert len(trail) == 3 and trail[0]["unit"] == f"attn{int(np.argmax(cos['attn']))}"
    after = layer_cosines(model, bs, [Unit(int(np.argmax(cos["attn"])), "attn")])
    assert after["attn"][int(np.argmax(cos["attn"]))] == pytest.approx(1.0)  # a removed attention changes nothing


def test_iterative_ablation_is_greedy_on_true_kl():
    model, prof = deep(torch.float64), deep_profile(torch.float64)  # float64: two methods must give one number
    plan = make_plan("drop-mlp", prof, 2, model=model, texts=SAMPLE_TEXTS, iterative=True, ranking="ablation")
    first = Unit(int(np.argmin(prof.scores["ablation_kl_mlp"].values)), "mlp")
    assert plan.predicted["rounds"][0]["unit"] == str(first)
    assert plan.predicted["rounds"][1]["score"] == pytest.approx(naive_kl(model, SAMPLE_TEXTS, plan.units()),
                                                        rel=1e-6, abs=1e-12)


def test_evo_is_elitist_and_its_fitness_is_the_true_kl():
    model, prof = deep(torch.float64), deep_profile(torch.float64)
    counts = {"attn": 2, "mlp": 2}
    seeds = seeds_from_profile(prof, counts)
    assert set(seeds) == {"redundancy", "ablation"}
    res = evo_search(model, SAMPLE_TEXTS, counts, seeds, EvoConfig(generations=6, offspring=4, initial_random=2))
    assert res.history == sorted(res.history, reverse=True)  # the parent never gets worse
    assert res.fitness <= min(res.seeds.values()) + 1e-12
    assert res.fitness == pytest.approx(naive_kl(model, SAMPLE_TEXTS, res.units), rel=1e-6)
    assert res.n_full > 0 and res.n_mini == 6 * 4
    kinds = [u.kind for u in res.units]
    assert kinds.count("attn") + kinds.count("block") == 2 and kinds.count("mlp") + kinds.count("block") == 2


def test_evo_policy_plan_round_trips(tmp_path):
    model, prof = deep(), deep_profile()
    plan = make_plan("evo", prof, 3, model=model, texts=SAMPLE_TEXTS, generations=2, offspring=2)
    assert len(plan.units()) == 3 and plan.meta["search"]["full_evaluations"] >= 1
    back = Plan.load(plan.save(tmp_path / "p.json"))
    assert back.units() == plan.units() and back.policy == plan.policy and back.meta == plan.meta
    assert back.resolve(model) == plan.units()


def test_make_state_is_canonical():
    assert make_state({"mlp": [3, 1], "attn": [2]}) == make_state({"attn": [2], "mlp": [1, 3]})


def test_an_option_a_policy_does_not_take_is_refused_before_work():
    with pytest.raises(PlanError, match=r"policy 'balanced-skip' does not take --rankng; it takes no options"):
        make_plan("balanced-skip", deep_profile(), 1.5, rankng="ablation")
    with pytest.raises(PlanError, match=r"'drop-block' does not take --levels; it takes --iterative, --ranking"):
        make_plan("drop-block", deep_profile(), 2, levels="4,2")
    with pytest.raises(PlanError, match=r"budget 'two' is not a number"):
        make_plan("drop-block", deep_profile(), "two")
    assert make_plan("drop-block", deep_profile(), "2").units() == make_plan("drop-block", deep_profile(), 2).units()


def test_plan_command_with_an_option_the_policy_does_not_take(tmp_path, capsys):
    deep_profile().save(tmp_path)
    capsys.readouterr()
    assert main(["plan", str(tmp_path), "--policy", "drop-block", "--budget", "2", "--levels", "4,2",
                 "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not take --levels" in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()
