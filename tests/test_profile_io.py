import json
from pathlib import Path

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
    (side,) = tmp_path.glob("profile.arrays-*.safetensors")
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
    names = sorted(f.name for f in tmp_path.iterdir())
    assert len(names) == 2 and names[0].startswith("profile.arrays-") and names[1] == "profile.json"


def test_two_profiles_in_one_directory_keep_their_own_arrays(tmp_path):
    a, b = make_profile(), make_profile()
    b.scores["cka"].values[0, 1] = 0.5  # different arrays
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert Profile.load(tmp_path / "a.json").scores["cka"].values[0, 1] != 0.5
    assert Profile.load(tmp_path / "b.json").scores["cka"].values[0, 1] == 0.5
    b.scores["cka"].values[0, 1] = 0.25  # a resave replaces b's sidecar and leaves a's alone
    b.save(tmp_path / "b.json")
    assert len(list(tmp_path.glob("a.arrays-*"))) == 1 and len(list(tmp_path.glob("b.arrays-*"))) == 1
    assert Profile.load(tmp_path / "b.json").scores["cka"].values[0, 1] == 0.25


def test_a_save_killed_between_sidecar_and_json_leaves_the_previous_profile(tmp_path):
    """A real SIGKILL after the new sidecar is written, before the JSON: the old pair still loads, and the
    next save removes the orphaned sidecar."""
    import subprocess
    import sys

    make_profile().save(tmp_path)
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_profile_io import make_profile
import lensbench.profiles as lp
def killed(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
lp.write_json = killed
p = make_profile()
p.scores["cka"].values[0, 1] = 0.5
p.save({str(tmp_path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert len(list(tmp_path.glob("profile.arrays-*"))) == 2  # the new sidecar, orphaned
    assert Profile.load(tmp_path).scores["cka"].values[0, 1] != 0.5  # the previous profile, whole
    make_profile().save(tmp_path)
    assert len(list(tmp_path.glob("profile.arrays-*"))) == 1 and not list(tmp_path.glob(".*tmp"))


def test_written_files_have_normal_permissions(tmp_path):
    import os
    import stat

    make_profile().save(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for f in tmp_path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask


def test_a_string_is_one_text(tiny):
    m = tiny("llama")
    one = lensbench.profile_model(m, "The city of Paris is in France.", progress=False)
    assert one.data["n_texts"] == 1


def test_plan_load_checks_the_model(tmp_path, tiny):
    from lensbench.errors import PlanError
    from lensbench.compress.plan import Plan
    from lensbench.units import Unit
    from lensbench.profiling import model_card

    a, b = tiny("llama"), tiny("qwen2")
    path = Plan.drop(model_card(a), [Unit(0, "block")]).save(tmp_path / "p.json")
    assert Plan.load(path, model=a).units() == [Unit(0, "block")]
    with pytest.raises(PlanError, match="made for 'tiny-llama'.*not for 'tiny-qwen2'"):
        Plan.load(path, model=b)


def test_a_nan_literal_is_refused_with_its_field_and_a_ranking_hole_is_refused_by_plan(tmp_path):
    """lensbench writes null for a missing value; a NaN literal means the file was edited or made elsewhere. A
    null inside a ranking would make a plan silently keep or drop that layer: refused, naming the layers."""
    from lensbench.errors import PlanError
    from lensbench.compress.policies import make_plan

    path = make_profile().save(tmp_path / "p.json")
    text = path.read_text()
    doc = json.loads(text)
    name = "influence"
    doc["model"] |= {"n_layers": 3, "units": {"block": "model.layers.{i}", "attn": "model.layers.{i}.self_attn",
                                              "mlp": "model.layers.{i}.mlp"}}
    doc["scores"][name]["values"][1] = float("nan")
    path.write_text(json.dumps(doc))  # json.dumps writes the literal NaN
    with pytest.raises(ProfileError, match=rf"scores\.{name}\.values\[1\] is NaN, which lensbench never writes"):
        Profile.load(path)
    doc["scores"][name]["values"][1] = None  # what lensbench itself writes for a missing value
    path.write_text(json.dumps(doc))
    profile = Profile.load(path)
    with pytest.raises(PlanError, match=rf"{name}' has no value for layer\(s\) \[1\]"):
        make_plan("drop-block", profile, 1, ranking=f"score:{name}")
