"""A local lm-evaluation-harness task (YAML + JSONL in tests/data/lmeval) run by lm-eval itself on the dense
model and on the applied plan, from the API and from `lensbench evaluate --lm-eval-task`."""
import json
from pathlib import Path

import pytest

from lensbench.cli import main
from lensbench.compress.plan import Plan
from lensbench.units import Unit
from lensbench.profiling import model_card

DATA = Path(__file__).parent / "data" / "lmeval" / "items.jsonl"
TASK = """task: lensbench_tiny_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lensbench[lm-eval]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    path = tmp_path / "task" / "tiny.yaml"
    path.parent.mkdir()
    path.write_text(TASK.format(data=DATA))
    return path


def test_lm_eval_task_runs_on_dense_and_plan(tiny, task):
    from lensbench.compress.lmeval import run_task

    model = tiny("llama")
    r = run_task(model, Plan.drop(model_card(model), [Unit(1, "block")]), task)
    assert r["task"] == "lensbench_tiny_facts"
    for side in ("dense", "plan"):
        assert {"acc,none", "acc_norm,none"} <= set(r[side]) and 0 <= r[side]["acc,none"] <= 1
        assert r[side]["acc,none"] * 4 == pytest.approx(round(r[side]["acc,none"] * 4))  # 4 documents


def test_cli_evaluate_with_an_lm_eval_task(tiny_dir, task, tmp_path, capsys):
    src = tiny_dir("llama")
    from lensbench.load import load

    Plan.drop(model_card(load(src)), [Unit(1, "block")]).save(tmp_path / "plan.json")
    args = ["evaluate", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "e.json"),
            "--n-texts", "2", "--cities", "4", "--topics", "0", "--speed-rounds", "1", "--decode-tokens", "2"]
    assert main(args + ["--lm-eval-task", str(task), "--lm-eval-limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "lm-eval lensbench_tiny_facts: " in out and "acc_norm" in out, out[-600:]
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["lm_eval"]["limit"] == 2 and "acc,none" in record["lm_eval"]["plan"]
    (tmp_path / "bad.yaml").write_text("metric_list: []\n")
    assert main(args + ["--lm-eval-task", str(tmp_path / "bad.yaml")]) == 2
    assert "names no task" in capsys.readouterr().err
    assert main(args + ["--lm-eval-limit", "2"]) == 2
