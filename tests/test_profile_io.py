import json

import numpy as np
import pytest

import lensbench
from lensbench import LayerScores, Profile
from lensbench.errors import ProfileError


def make_profile():
    p = Profile(model={"name": "m", "fingerprint": "abc"}, data={"n_texts": 3}, meta={"lensbench": "0.1.0"})
    p.add(LayerScores("block_cosine", [0.9, 0.5, np.nan], False, analysis="redundancy", params={"k": 1}),
          LayerScores("influence", [0.1, 0.5, 0.2], True),
          LayerScores("cka", np.eye(4), None, axes=("state", "state")))
    return p


def test_round_trip_inline_and_sidecar(tmp_path):
    p = make_profile()
    path = p.save(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["schema"] == "lensbench.profile/1"
    assert doc["scores"]["block_cosine"]["values"] == [0.9, 0.5, None]  # 1-D inline, NaN as null
    assert doc["scores"]["cka"]["values"] == {"sidecar": "cka"}
    q = Profile.load(tmp_path)
    assert q.model == p.model and q.data == p.data and set(q.scores) == set(p.scores)
    for name in p.scores:
        np.testing.assert_array_equal(q[name].values, p[name].values)
        assert q[name].higher_is_more_important is p[name].higher_is_more_important
        assert q[name].params == p[name].params


def test_ranking_respects_direction():
    p = make_profile()
    assert p["influence"].ranking() == [1, 2, 0]  # higher = more important
    assert p["block_cosine"].ranking() == [1, 0, 2]  # lower = more important; NaN last
    with pytest.raises(ValueError, match="descriptive"):
        p["cka"].ranking()


def test_frames_and_tables(tmp_path):
    p = make_profile()
    frame = p.to_frame()
    assert list(frame.columns) == ["block_cosine", "influence"] and frame.index.name == "layer"
    assert list(p["influence"].to_frame()["rank"]) == [2, 0, 1]
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_csv(p.to_table(tmp_path / "t.csv"), index_col="layer"), frame)
    pd.testing.assert_frame_equal(pd.read_parquet(p.to_table(tmp_path / "t.parquet")), frame)
    with pytest.raises(ProfileError, match="csv or .parquet"):
        p.to_table(tmp_path / "t.xlsx")


def test_plot_and_repr():
    p = make_profile()
    assert p["influence"].plot().data[0].type == "bar"
    assert p["cka"].plot().data[0].type == "heatmap"
    assert "higher=more important" in repr(p["influence"]) and "3 scores" in repr(p)


def test_truncated_json(tmp_path):
    path = make_profile().save(tmp_path)
    path.write_text(path.read_text()[:200])
    with pytest.raises(ProfileError, match="not valid JSON.*truncated"):
        Profile.load(tmp_path)


def test_other_schema_version(tmp_path):
    path = make_profile().save(tmp_path)
    doc = json.loads(path.read_text())
    doc["schema"] = "lensbench.profile/2"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="schema 'lensbench.profile/2'"):
        Profile.load(tmp_path)


def test_torn_sidecar(tmp_path):
    make_profile().save(tmp_path)
    side = tmp_path / "profile.arrays.safetensors"
    side.write_bytes(side.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(ProfileError, match="does not match profile.json"):
        Profile.load(tmp_path)


def test_malformed_scores(tmp_path):
    path = make_profile().save(tmp_path)
    doc = json.loads(path.read_text())
    doc["scores"]["influence"]["shape"] = [7]
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="malformed"):
        Profile.load(tmp_path)


def test_not_a_profile(tmp_path):
    (tmp_path / "profile.json").write_text("[1, 2]")
    with pytest.raises(ProfileError, match="not a lensbench profile"):
        Profile.load(tmp_path)


def test_profile_for_another_model(tmp_path, tiny, texts):
    a, b = tiny("llama"), tiny("qwen2")
    lensbench.profile_model(a, texts, progress=False).save(tmp_path)
    assert Profile.load(tmp_path, model=a).model["name"] == "tiny-llama"
    with pytest.raises(ProfileError, match="measured on 'tiny-llama'.*not on 'tiny-qwen2'"):
        Profile.load(tmp_path, model=b)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous profile intact and no temporary files."""
    p = make_profile()
    p.save(tmp_path)
    before = (tmp_path / "profile.json").read_bytes()
    import lensbench.atomic as atomic

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.json, "dumps", fail)
    p.data["n_texts"] = 99
    with pytest.raises(OSError):
        p.save(tmp_path)
    assert (tmp_path / "profile.json").read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["profile.arrays.safetensors", "profile.json"]


def test_written_files_have_normal_permissions(tmp_path):
    import os
    import stat

    make_profile().save(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for f in tmp_path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask
