"""Bit-allocation policies: budgets are met exactly as stated, the orderings are the rankings', the
knapsack is optimal (checked by brute force), bisection respects its bound, and bad budgets are refused."""
import itertools

import numpy as np
import pytest

from lensbench.compress.apply import apply
from lensbench.compress.policies.bits import knapsack
from lensbench.errors import PlanError
from lensbench.gpu.modules import QuantLinear
from lensbench.compress.policies import make_plan
from lensbench.profiling import profile_model


@pytest.fixture(scope="module")
def quant_profile():
    from lensbench.testing import SAMPLE_TEXTS, tiny_model

    model = tiny_model("llama", n_layers=4)
    prof = profile_model(model, list(SAMPLE_TEXTS), analyses=["redundancy", "quant_sensitivity", "weight_outliers"],
                         batch_size=4, seq_len=32, progress=False,
                         analysis_params={"quant_sensitivity": {"bits": (2, 3, 4, 8), "group_size": 32,
                                                                     "per_linear": True}})
    return model, prof


def _bits(plan):
    return {k: v.bits for k, v in plan.quant_actions().items()}


@pytest.mark.parametrize("ranking", ["lim", "zd", "quant", "random"])
def test_rank_and_threshold_puts_the_least_important_low(quant_profile, ranking):
    model, prof = quant_profile
    plan = make_plan("bits-rank", prof, 3.5, ranking=ranking, levels="4,2", group_size=32)
    bits = _bits(plan)
    assert sorted(bits.values()) == [2, 4, 4, 4]  # n_low = round((4-3.5)/2*4) = 1
    assert plan.predicted["average_bits"] == pytest.approx(3.5)
    rev = make_plan("bits-rank", prof, 3.5, ranking=ranking, levels="4,2", group_size=32, reverse=True)
    if ranking != "random":
        assert plan.predicted["low_blocks"] != rev.predicted["low_blocks"]
    if ranking == "quant":  # the block whose int2 KL is smallest goes low
        kl = prof.scores["quant_kl_block_int2"].values
        assert plan.predicted["low_blocks"] == [int(np.argmin(kl))]
    with apply(model, plan):
        assert sum(isinstance(m, QuantLinear) for m in model.module.modules()) == 4 * 7


def test_knapsack_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    err = rng.random((5, 3))
    cost = np.array([[2, 3, 4]] * 5) * rng.integers(1, 4, (5, 1))
    budget = 0.6 * cost.max(1).sum()
    choice = knapsack(err, cost, budget, resolution=10_000)
    best = min((sum(err[u, o] for u, o in enumerate(c)), c) for c in itertools.product(range(3), repeat=5)
               if sum(cost[u, o] for u, o in enumerate(c)) <= budget)
    assert sum(cost[u, o] for u, o in enumerate(choice)) <= budget
    assert sum(err[u, o] for u, o in enumerate(choice)) == pytest.approx(best[0])


@pytest.mark.parametrize("unit", ["block", "linear"])
def test_dp_meets_the_average_and_beats_uniform_on_its_own_objective(quant_profile, unit):
    model, prof = quant_profile
    plan = make_plan("bits-dp", prof, 3.5, unit=unit, group_size=32)
    assert plan.predicted["average_bits"] <= 3.5 + 1e-9
    assert plan.predicted["average_bits"] > 3.0
    with apply(model, plan):
        pass


def test_bisect_keeps_the_bound_and_reports_its_evaluations(quant_profile):
    model, prof = quant_profile
    from lensbench.testing import SAMPLE_TEXTS

    plan = make_plan("bits-bisect", prof, 1e-3, model=model, texts=list(SAMPLE_TEXTS), levels="4,2", group_size=32)
    trail = plan.meta["search"]["kl_by_n_low"]
    assert plan.predicted["calibration_kl"] <= 1e-3
    assert plan.meta["search"]["evaluations"] <= 1 + 3  # 0, then log2(4)+1 bisection steps at most
    n = plan.predicted["n_low"]
    assert str(n + 1) not in trail or trail[str(n + 1)] > 1e-3


@pytest.mark.parametrize("policy,budget,options,msg", [
    ("bits-rank", 5.0, {"levels": "4,2"}, "between 2 and 4"),
    ("bits-rank", 3.0, {"levels": "4,7"}, "level 7"),
    ("bits-rank", 3.0, {"levels": "4"}, "must name 2"),
    ("bits-rank", 3.0, {"group_size": 12}, "multiple of 8"),
    ("bits-rank", 3.0, {"ranking": "nonsense"}, "unknown ranking"),
    ("bits-dp", 1.5, {}, "between 2 and 8"),
    ("bits-dp", 3.0, {"unit": "head"}, "--unit 'head' is not one of block, linear"),
    ("bits-bisect", 0.1, {}, "runs the model"),
])
def test_bad_budgets_are_refused(quant_profile, policy, budget, options, msg):
    _, prof = quant_profile
    with pytest.raises(PlanError, match=msg):
        make_plan(policy, prof, budget, **options)


def test_missing_sensitivity_is_named(tiny, texts):
    model = tiny("llama")
    prof = profile_model(model, texts, analyses=["redundancy"], batch_size=4, seq_len=32, progress=False)
    with pytest.raises(PlanError, match="quant_sensitivity"):
        make_plan("bits-dp", prof, 4.0)


@pytest.mark.parametrize("unit", ["block", "linear"])
def test_evo_bits_never_ends_worse_than_its_seeds_and_keeps_the_budget(quant_profile, unit):
    model, prof = quant_profile
    from lensbench.testing import SAMPLE_TEXTS

    plan = make_plan("evo-bits", prof, 3.5, model=model, texts=list(SAMPLE_TEXTS), unit=unit, group_size=32,
                     generations=4, offspring=4)
    search = plan.meta["search"]
    assert plan.predicted["average_bits"] <= 3.5 + 1e-9
    assert plan.predicted["calibration_kl"] <= min(search["start_calibration_kl"].values()) + 1e-12
    assert search["calibration_kl_by_generation"] == sorted(search["calibration_kl_by_generation"], reverse=True)
    assert {"dp", "rank-quant"} <= set(search["start_calibration_kl"])
    with apply(model, plan):
        pass


def test_gguf_scheme_budgets_count_the_real_bits_of_the_saved_file(quant_profile, tmp_path):
    """With --scheme gguf the budget is the GGML types' real bits per weight (scales included): the tiny model's
    rows (32 and 64 inputs) are not multiples of 256, so 8 bits are Q8_0 (8.5) and 4 bits fall back to Q4_0 (4.5);
    the saved GGUF file holds exactly the predicted average over the blocks' linears."""
    from lensbench.compress.save import compress

    model, prof = quant_profile
    plan = make_plan("bits-rank", prof, 6.5, ranking="lim", levels="8,4", scheme="gguf")
    assert sorted(_bits(plan).values()) == [4, 4, 8, 8] and plan.predicted["average_bits"] == pytest.approx(6.5)
    with pytest.raises(PlanError, match="between 4.5 and 8.5"):
        make_plan("bits-rank", prof, 4.25, ranking="lim", levels="8,4", scheme="gguf")
    saved = compress(model, plan, format="gguf", out=tmp_path / "ck")
    linears = [t for t in saved.record["tensors"] if t["name"].startswith("blk.") and len(t["shape"]) == 2]
    bits = sum(t["bits_per_weight"] * np.prod(t["shape"]) for t in linears) / sum(np.prod(t["shape"]) for t in linears)
    assert bits == pytest.approx(plan.predicted["average_bits"])
    dp = make_plan("bits-dp", prof, 6.5, levels="4,8", scheme="gguf")
    assert dp.predicted["average_bits"] <= 6.5 + 1e-9
