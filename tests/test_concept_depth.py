"""Concept depth: the vectorised probes agree with the scikit-learn per-layer loop, depth points follow
their stated rules, activations are captured once, controls and conditions run, bad input is refused."""
import numpy as np
import pytest
import torch

from lensbench.errors import LensbenchError
from lensbench.probes.depth import ConceptDepthView, concept_depth
from lensbench.probes.run import concept_depth_profile, features, probe_task
from lensbench.probes.tasks import Task, load_task
from lensbench.probes.trainer import ProbeConfig, fit_probes, sklearn_reference


def _synthetic(L=5, n=400, d=24, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((L, n, d)).astype(np.float32)
    for layer in range(L):
        X[layer, :, :2] += 0.35 * layer * (2 * y[:, None] - 1)
    return torch.tensor(X), y


def test_vectorised_probes_match_sklearn_within_one_point():
    X, y = _synthetic()
    cfg = ProbeConfig(seeds=(0, 1), Cs=(0.01, 0.1, 1.0), folds=3)
    a, b = fit_probes(X, y, cfg), sklearn_reference(X.numpy(), y, cfg)
    assert np.abs(a.metrics["accuracy"] - b.metrics["accuracy"]).max() <= 0.01
    assert np.abs(a.metrics["auc"] - b.metrics["auc"]).max() <= 0.01
    assert (a.best_C == b.best_C).mean() >= 0.8
    acc = a.mean()
    assert acc[0] < 0.65 < 0.9 < acc[-1]  # the signal grows with depth
    assert (a.ci95() >= 0).all()


@pytest.mark.parametrize("curve,jump,conv", [
    ([0.5, 0.5, 0.6, 0.9, 0.95, 0.95], 3, 4),
    ([0.5, 0.7, 0.71, 0.72, 0.9, 0.9], 1, 4),  # half-rise level 0.7 is reached at layer 1
])
def test_depth_points_follow_their_rules(curve, jump, conv):
    d = concept_depth(curve, eps=0.01)
    assert (d["jump"], d["converging"]) == (jump, conv)
    assert d["converging_rel"] == conv / len(curve)
    assert concept_depth([0.5, 0.52, 0.51])["converging"] is None  # never above chance + 0.05
    assert concept_depth(curve, rule="delta", delta=0.15)["jump"] == int(np.argmax(np.diff(curve) >= 0.15)) + 1


def test_activations_are_captured_once_and_reused(tiny, tmp_path, monkeypatch):
    import lensbench.store as store

    model = tiny("llama")
    task = load_task("coinflip", 20)
    X = features(model, task, tmp_path, site="resid", seq_len=128)
    assert X.shape == (model.n_layers, 40, model.d_model)
    calls = []
    monkeypatch.setattr(store, "capture_batch", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("recomputed")))
    X2 = features(model, task, tmp_path, site="resid", seq_len=128)
    assert torch.equal(X, X2) and not calls


def test_probe_task_with_controls_and_conditions(tiny, tmp_path):
    model = tiny("llama")
    task = load_task("coinflip", 30)
    cfg = ProbeConfig(seeds=(0,), Cs=(0.1, 1.0), folds=3)
    scores, rows = probe_task(model, task, tmp_path, site="paper", conditions=("clean", "noise", "int8"), cfg=cfg,
                              seq_len=128)
    names = {s.name for s in scores}
    assert {"probe_accuracy_coinflip", "probe_control_coinflip", "probe_selectivity_coinflip",
            "probe_accuracy_coinflip@noise", "probe_accuracy_coinflip@int8"} <= names
    by = {s.name: s.values for s in scores}
    assert np.allclose(by["probe_selectivity_coinflip"], by["probe_accuracy_coinflip"] - by["probe_control_coinflip"])
    assert [r["condition"] for r in rows] == ["clean", "noise", "int8"]
    clean = features(model, task, tmp_path, site="paper", seq_len=128)
    assert not torch.equal(clean, features(model, task, tmp_path, site="paper", condition="int8", seq_len=128))


def test_profile_and_plot(tiny, tmp_path):
    model = tiny("llama")
    tasks = [load_task("coinflip", 20), load_task("cities", 20)]
    prof = concept_depth_profile(model, tasks, tmp_path / "cache", site="resid", cfg=ProbeConfig(seeds=(0,), folds=3),
                                 seq_len=128, progress=False)
    prof.save(tmp_path / "out")
    from lensbench.profiles import Profile

    back = Profile.load(tmp_path / "out", model=model)
    view = ConceptDepthView(back)
    assert len(view.table()) == 2 and "ConceptDepthView(2 tasks" in repr(view)
    fig = view.plot()
    assert len(fig.data) >= 2


def test_bad_input_is_refused(tiny, tmp_path):
    model = tiny("llama")
    long = Task("long", "custom", ["word " * 300, "short"] * 10, [1, 0] * 10)
    with pytest.raises(LensbenchError, match="longer than the 64"):
        features(model, long, tmp_path, site="resid", seq_len=64)
    few = Task("few", "custom", ["a", "b", "c", "d"], [0, 1, 0, 1])
    with pytest.raises(LensbenchError, match="fewer than"):
        fit_probes(torch.zeros(2, 4, 3), few.labels, ProbeConfig(folds=5))
    with pytest.raises(LensbenchError, match="unknown condition"):
        features(model, few, tmp_path, condition="fp8")


def test_report_tables_and_family_ordering(tiny, tmp_path, monkeypatch):
    from lensbench.probes import report

    model = tiny("llama")
    tasks = [load_task("cities", 20), load_task("sst2", 20), load_task("coinflip", 20)]
    cfg = ProbeConfig(seeds=(0,), Cs=(1.0,), folds=3)
    root = tmp_path / "concept-depth"
    concept_depth_profile(model, tasks, tmp_path / "cache", site="resid", cfg=cfg, seq_len=128,
                          progress=False).save(root / "tiny")
    concept_depth_profile(model, tasks[:1], tmp_path / "cache", site="resid", cfg=cfg, seq_len=128, progress=False,
                          conditions=("clean", "noise")).save(root / "tiny-robust")
    monkeypatch.setattr(report, "render_png", lambda fig, path: False)  # no browser needed for the text
    text = report.write(root).read_text()
    assert "| cities | factual |" in text and "| coinflip | inferential |" in text
    assert "factual < emotional" in text and ("confirmed" in text or "not reproduced" in text)
    assert "| cities | noise |" in text


def test_an_interrupted_run_resumes_at_the_first_unfinished_task(tiny, tmp_path, monkeypatch):
    from dataclasses import replace

    from lensbench.probes import run

    model = tiny("llama")
    tasks = [load_task("coinflip", 20), load_task("cities", 20)]
    cfg = ProbeConfig(seeds=(0,), Cs=(1.0,), folds=3)
    kw = dict(site="resid", seq_len=128, progress=False)
    cache, ck = tmp_path / "cache", tmp_path / "checkpoint"
    whole = concept_depth_profile(model, tasks, cache, cfg=cfg, **kw)

    calls, real = [], run.probe_task

    def interrupted_once(model, task, *a, **k):
        calls.append(task.name)
        if calls == ["coinflip", "cities"]:
            raise KeyboardInterrupt  # the run is stopped during the second task
        return real(model, task, *a, **k)

    monkeypatch.setattr(run, "probe_task", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        run.concept_depth_profile(model, tasks, cache, cfg=cfg, checkpoint=ck, **kw)
    resumed = run.concept_depth_profile(model, tasks, cache, cfg=cfg, checkpoint=ck, **kw)
    assert calls == ["coinflip", "cities", "cities"]  # coinflip came back from the checkpoint
    assert resumed.tables["concept_depth"].rows == whole.tables["concept_depth"].rows
    assert set(resumed.scores) == set(whole.scores)
    assert all(np.allclose(resumed.scores[n].values, whole.scores[n].values) for n in whole.scores)

    calls.clear()  # other settings do not reuse it
    run.concept_depth_profile(model, tasks[:1], cache, cfg=replace(cfg, folds=4), checkpoint=ck, **kw)
    assert calls == ["coinflip"]
