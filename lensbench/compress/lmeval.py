"""A user's local lm-evaluation-harness task (a task YAML and the data it names), run on the dense model and
on the applied plan (or a saved checkpoint), through lm-evaluation-harness itself: its prompts, its scoring.
An optional extra (`pip install 'lensbench[lm-eval]'`)."""
from __future__ import annotations

from pathlib import Path

from ..errors import LensbenchError
from .apply import applied
import yaml


def task_name(path: Path) -> str:

    if not path.is_file():
        raise LensbenchError(f"lm-eval task {path} does not exist: give the task's YAML file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LensbenchError(f"{path} is not a readable YAML file ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
        raise LensbenchError(f"{path} names no task (an lm-eval task YAML has a `task:` field)")
    return doc["task"]


def check_installed() -> None:
    try:
        import lm_eval  # noqa: F401  # optional: lm-evaluation-harness (the lm-eval extra)
    except ImportError:
        raise LensbenchError("lm-evaluation-harness is not installed: pip install 'lensbench[lm-eval]'") from None


def run_task(model, target, task_yaml: str | Path, limit: int | None = None, batch_size: int = 8) -> dict:
    """{"task", "dense": {metric: value}, "plan": {metric: value}} for the task in `task_yaml`."""
    import lm_eval  # optional: lm-evaluation-harness (the lm-eval extra)
    from lm_eval.models.huggingface import HFLM  # optional: lm-evaluation-harness (the lm-eval extra)
    from lm_eval.tasks import TaskManager  # optional: lm-evaluation-harness (the lm-eval extra)

    path = Path(task_yaml)
    name = task_name(path)
    manager = TaskManager(include_path=str(path.parent.resolve()))

    def run() -> dict:
        lm = HFLM(pretrained=model.module, tokenizer=model.tokenizer, batch_size=batch_size, device="cpu")
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                          log_samples=False)
        except Exception as exc:  # a task lm-eval cannot build (bad data path, unknown metric): its own words
            raise LensbenchError(f"lm-eval could not run task {name!r} from {path}: "
                                 f"{str(exc).splitlines()[0][:300]}") from None
        return {k: float(v) for k, v in out["results"][name].items() if isinstance(v, (int, float)) and "," in k}

    dense = run()
    with applied(model, target):
        reduced = run()
    return {"task": name, "file": str(path), "limit": limit, "dense": dense, "plan": reduced}
