"""Layer-update geometry: the tokenwise fits recover updates that are tokenwise, and the functional link
is measured through the real model."""
import numpy as np
import pytest
import torch

from lensbench.analyses.geometry import Geometry
from lensbench.profiles import Profile
from lensbench.profiling import profile_model
from lensbench.stats import spearman


def bank(n=400, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 2.0


def test_diagonal_fit_recovers_a_diagonal_map():
    x = bank()
    a = torch.linspace(-1, 2, x.shape[1])
    delta = x * a
    geo = Geometry(cls="diagonal", k=16)
    T = geo._fit(x, delta, x, geo._neighbours(x, x, exclude_self=True))
    torch.testing.assert_close(T, delta, atol=1e-4, rtol=1e-4)


def test_lowrank_fit_recovers_a_low_rank_map_and_leaves_out_self():
    x = bank()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(x.shape[1], 2, generator=g) @ torch.randn(2, x.shape[1], generator=g)
    delta = x @ W
    geo = Geometry(cls="lowrank", rank=2, k=40, ridge=1e-8)
    idx = geo._neighbours(x, x, exclude_self=True)
    assert not (idx == torch.arange(x.shape[0])[:, None]).any()
    T = geo._fit(x, delta, x, idx)
    assert float(((T - delta).norm(dim=-1) / delta.norm(dim=-1)).mean()) < 1e-3
    # rank 1 cannot hold a rank-2 map
    T1 = Geometry(cls="lowrank", rank=1, k=40, ridge=1e-8)._fit(x, delta, x, idx)
    assert float(((T1 - delta).norm(dim=-1) / delta.norm(dim=-1)).mean()) > 0.05


def test_exact_fit_replacement_changes_nothing(tiny, texts, monkeypatch):
    model = tiny("llama")
    geo = Geometry(k=8, tokens=256)
    geo.start(model)
    from lensbench.capture import CaptureSpec, capture_batch
    trace, _ = capture_batch(model, CaptureSpec(sites=Geometry.sites).validate(model), model.tokenize(texts))
    geo.update(trace)
    dense = geo.dense_

    def exact(x, delta, q, idx):  # the true update of the queried tokens
        mask = dense.mask.clone()
        mask[:, 0] = False
        layer = next(i for i in range(model.n_layers) if torch.equal(dense.pre[i][mask].float(), q))
        return (dense.post[layer] - dense.pre[layer])[mask].float()

    monkeypatch.setattr(geo, "_fit", exact)
    assert all(abs(geo._replacement_kl(i)) < 1e-5 for i in range(model.n_layers))


@pytest.mark.parametrize("cls", ["lowrank", "diagonal"])
def test_geometry_in_a_profile(tiny, texts, tmp_path, cls):
    model = tiny("llama")
    prof = profile_model(model, texts, analyses=("geometry",), progress=False,
                         analysis_params={"geometry": {"cls": cls, "k": 8, "tokens": 256}})
    L = model.n_layers
    for name in ("cos_tokenwise", "energy_tokenwise", "error", "replacement_kl", "proj_residual"):
        v = prof.scores[f"geometry_{name}"].values
        assert v.shape == (L,) and np.all(np.isfinite(v))
    assert np.all(prof.scores["geometry_replacement_kl"].values >= -1e-6)
    assert prof.scores["geometry_error"].higher_is_more_important is True
    rho = prof.tables["geometry_summary"].rows[0]["spearman_error_vs_replacement_kl"]
    assert np.isnan(rho) or -1 <= rho <= 1
    back = Profile.load(prof.save(tmp_path / "p"))
    assert back.tables["geometry_summary"].rows[0]["class"] == cls


def test_bad_geometry_parameters(tiny, texts):
    with pytest.raises(Exception, match="rank < k"):
        profile_model(tiny("llama"), texts, analyses=("geometry",), progress=False,
                      analysis_params={"geometry": {"k": 4, "rank": 4}})


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1, np.nan], [1, 2]))


def test_agreement_matrix_in_profile(tiny, texts, tmp_path):
    from lensbench.agreement import NAME, rankings

    prof = profile_model(tiny("llama"), texts, analyses=("redundancy", "ablation"), progress=False)
    a = prof.scores[NAME]
    names = a.params["rankings"]
    assert set(names) == set(rankings(prof)) and "ablation_kl_block" in names and "block_cosine" in names
    m = a.values
    assert m.shape == (len(names), len(names)) and np.allclose(np.diag(m)[~np.isnan(np.diag(m))], 1)
    assert np.allclose(m, m.T, equal_nan=True)
    i, j = names.index("ablation_kl_block"), names.index("ablation_dloss_block")
    imp = rankings(prof)
    assert m[i, j] == pytest.approx(spearman(imp["ablation_kl_block"], imp["ablation_dloss_block"]), nan_ok=True)
    # cosine is "lower = more important": its importance is the negated cosine
    assert np.allclose(imp["block_cosine"], -prof.scores["block_cosine"].values)
    back = Profile.load(prof.save(tmp_path / "p"))
    assert back.scores[NAME].params["rankings"] == names
