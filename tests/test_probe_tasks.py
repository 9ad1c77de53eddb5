"""Probe tasks from packaged real data: balanced, deterministic, with provenance; user task files are read
or refused with one clear error."""
import json
import re

import numpy as np
import pytest

from lensbench.probes.tasks import FAMILIES, TASKS, TaskError, load_task, load_task_file


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_is_balanced_deterministic_and_sourced(name):
    a = load_task(name, 100, seed=3)
    b = load_task(name, 100, seed=3)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    assert a.family in FAMILIES and a.provenance["source"]
    assert int(a.labels.sum()) * 2 == len(a) and len(a) == 200
    assert all(isinstance(t, str) and t.strip() for t in a.texts)
    assert load_task(name, 100, seed=4).texts != a.texts


def test_families_are_all_covered_with_nine_or_more_tasks():
    fams = [f for f, _ in TASKS.values()]
    assert len(TASKS) >= 9 and all(fams.count(f) >= 2 for f in FAMILIES)


def test_coinflip_label_is_the_parity_of_flips():
    t = load_task("coinflip", 200)
    for text, label in zip(t.texts, t.labels, strict=True):
        flips = len(re.findall(r"\w+ flips the coin", text))
        assert label == int(flips % 2 == 0)


def test_cities_statements_name_true_and_false_countries():
    t = load_task("cities", 50)
    assert all(s.startswith("The city of ") and s.endswith(".") for s in t.texts)


def test_user_task_files(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text("text,label\n" + "\n".join(f"sentence {i},{i % 2}" for i in range(20)))
    t = load_task_file(csv)
    assert len(t) == 20 and t.name == "mine"
    jl = tmp_path / "mine.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"s{i}", "label": i % 2}) for i in range(10)))
    assert len(load_task_file(jl)) == 10


@pytest.mark.parametrize("content,msg", [
    ("text,lbl\na,1\nb,0\n", "columns 'text' and 'label'"),
    ("text,label\na,1\nb,1\n", "only one class"),
    ("text,label\na,0\nb,1\nc,2\n", "binary"),
    ("text,label\na,yes\nb,no\n", "0 or 1"),
    ("text,label\n", "has no rows"),
])
def test_bad_task_files_are_refused(tmp_path, content, msg):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(TaskError, match=msg):
        load_task_file(f)


def test_unknown_task_and_missing_file():
    with pytest.raises(TaskError, match="unknown probe task"):
        load_task("sarcasm")
    with pytest.raises(TaskError, match="does not exist"):
        load_task_file("/nonexistent/tasks.csv")
