"""Concept depth of a model: capture each task's representations once (into an activation store, so a
second run on the same model and data reads them back), probe every layer, add controls and
robustness conditions, and write it all into the Profile.

Representations (`site`): "paper" = the normalised mid-block state (the input of the MLP's norm
output, i.e. `post_attention_layernorm` output in Llama, the paper's tap), "resid" = the residual
stream after each block. Position: the last token for causal LMs (as the paper), the mean over
tokens for encoders (their sentence-embedding convention).

Conditions: "clean"; "noise" — three identical random letters ('aaa' or 'bbb', seeded) prepended
to every text without a separator, as in the paper's code; "int8" / "int4" — every block linear
quantised with lensbench's packed weights through `apply` (group 128).

Controls: the same probe trained on the task's labels shuffled (same balance, seeded; the first probe
seed only); selectivity = task accuracy - control accuracy, per layer.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import sys
from dataclasses import replace
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..adapters import site_name
from ..errors import LensbenchError
from ..executor import ExecutorConfig, run_items
from ..model import Model
from ..profiles import LayerScores, Profile, Table
from ..profiling import model_card
from ..simquant import Grid, block_linears, simulated
from ..store import capture_to_store
from ..version import __version__

from .depth import concept_depth
from .tasks import Task
from .trainer import ProbeConfig, fit_probes

SITES = {"paper": "ln2.hook_normalized", "resid": "hook_resid_post"}
DEFAULT_PROBES = ProbeConfig()
CONDITIONS = ("clean", "noise", "int8", "int4")


def noisy(texts: Sequence[str], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [chr(97 + int(rng.integers(2))) * 3 + t for t in texts]


def _quant_context(model: Model, condition: str):
    if condition not in ("int8", "int4"):
        return nullcontext()
    bits = int(condition[3:])  # every block linear at this bit-width, group 128, as a packed plan would store
    return simulated(model, {f"{model.adapter.block_path(i)}.{n}": Grid(bits, 128)
                             for i in range(model.n_layers) for n in block_linears(model)})


def check_lengths(model: Model, task: Task, seq_len: int) -> None:
    lengths = [len(ids) for ids in model.tokenizer(task.texts)["input_ids"]]
    longest = max(lengths)
    if longest > seq_len:
        raise LensbenchError(f"task {task.name!r} has a text of {longest} tokens, longer than the {seq_len} the probe "
                             f"reads (the last token would be cut off): raise --seq-len (the model's context is "
                             f"{model.max_context}) or drop the long texts")


def features(model: Model, task: Task, cache: Path, site: str = "paper", condition: str = "clean",
             seq_len: int = 256, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """[L, n, d] representations of the task's texts, captured once into a store under `cache`."""
    if site not in SITES:
        raise LensbenchError(f"unknown representation {site!r}: use {' or '.join(SITES)}")
    if condition not in CONDITIONS:
        raise LensbenchError(f"unknown condition {condition!r}: use one of {', '.join(CONDITIONS)}")
    if seq_len > (model.max_context or seq_len):
        raise LensbenchError(f"--seq-len {seq_len} is longer than {model.name}'s context of {model.max_context}")
    texts = noisy(task.texts) if condition == "noise" else list(task.texts)
    check_lengths(model, Task(task.name, task.family, texts, task.labels), seq_len)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    root = Path(cache) / f"{model.name}-{model.fingerprint()[:12]}" / f"{task.name}-{digest}-{site}-{condition}"
    positions = "last" if model.is_causal_lm else "mean"
    with _quant_context(model, condition):
        store = capture_to_store(model, texts, root, sites=[SITES[site]], positions=positions, batch_size=batch_size,
                                 seq_len=seq_len, dtype=torch.float32, progress=progress)
    return torch.stack([store.load(site_name(i, SITES[site])) for i in range(model.n_layers)])


def probe_task(model: Model, task: Task, cache: Path, *, site: str = "paper", conditions: Sequence[str] = ("clean",),
               cfg: ProbeConfig = DEFAULT_PROBES, control: bool = True, seq_len: int = 256,
               depth_params: dict | None = None, progress: bool = False) -> tuple[list[LayerScores], list[dict]]:
    """LayerScores (accuracy, its 95% interval, control, selectivity per condition) and depth rows."""
    scores, rows = [], []
    params = {"task": task.name, "family": task.family, "site": site, "n": len(task), **task.provenance}
    for cond in conditions:
        X = features(model, task, cache, site, cond, seq_len, progress=progress)
        curves = fit_probes(X, task.labels, cfg)
        tag = task.name if cond == "clean" else f"{task.name}@{cond}"
        acc = curves.mean("accuracy")
        p = params | {"condition": cond, "probe": curves.config}
        scores += [
            LayerScores(f"probe_accuracy_{tag}", acc, None, ("layer",), "concept_depth",
                        f"test accuracy of a logistic probe on {task.name} ({cond}), mean of {len(cfg.seeds)} "
                        f"seeds", p),
            LayerScores(f"probe_accuracy_ci_{tag}", curves.ci95("accuracy"), None, ("layer",), "concept_depth",
                        "half-width of the 95% interval over seeds", p),
            LayerScores(f"probe_auc_{tag}", curves.mean("auc"), None, ("layer",), "concept_depth", "test ROC AUC", p),
            LayerScores(f"probe_f1_{tag}", curves.mean("f1"), None, ("layer",), "concept_depth", "test F1", p),
        ]
        row = {"task": task.name, "family": task.family, "condition": cond, "site": site,
               **{k: v for k, v in concept_depth(acc, **(depth_params or {})).items() if k != "params"}}
        if control and cond == "clean":
            shuffled = np.random.default_rng(12345).permutation(task.labels)
            # one seed: the control measures how well the probe fits noise, and costs a full fit per seed
            ctrl = fit_probes(X, shuffled, replace(cfg, seeds=cfg.seeds[:1])).mean("accuracy")
            scores += [
                LayerScores(f"probe_control_{tag}", ctrl, None, ("layer",), "concept_depth",
                            "test accuracy of the same probe on shuffled labels (control task)", p),
                LayerScores(f"probe_selectivity_{tag}", acc - ctrl, None, ("layer",), "concept_depth",
                            "task accuracy - control accuracy", p),
            ]
            row["max_selectivity"] = float((acc - ctrl).max())
        rows.append(row)
    return scores, rows


def run_key(model: Model, task: Task, site: str, conditions: Sequence[str], cfg: ProbeConfig, seq_len: int,
            depth_params: dict | None) -> str:
    """What a task's results depend on: weights, texts, labels and every setting."""
    doc = {"model": model.fingerprint(), "texts": hashlib.sha256("\x00".join(task.texts).encode()).hexdigest(),
           "labels": [int(v) for v in task.labels], "site": site, "conditions": list(conditions),
           "cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}, "seq_len": seq_len,
           "depth": depth_params or {}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class ProbeWork:
    """`probe_task` of one [task index, condition] per item, for `concept_depth_profile` on an executor's
    workers: each worker captures that condition's features (into the shared activation cache) and fits the
    probes; the scores and depth rows come back as JSON."""

    def __init__(self, tasks: Sequence[Task], cache: Path, site: str, cfg: ProbeConfig, seq_len: int,
                 depth_params: dict | None):
        self.tasks, self.cache, self.site, self.cfg = list(tasks), Path(cache), site, cfg
        self.seq_len, self.depth_params = seq_len, depth_params

    def setup(self, model: Model) -> None:
        self.model = model

    def run(self, item) -> dict:
        task, condition = item
        scores, rows = probe_task(self.model, self.tasks[task], self.cache, site=self.site, conditions=[condition],
                                  cfg=self.cfg, seq_len=self.seq_len, depth_params=self.depth_params)
        arrays: dict = {}
        docs = [s.to_dict(arrays) for s in scores]
        return {"scores": docs, "arrays": {k: v.tolist() for k, v in arrays.items()}, "rows": rows}


def _landed(results: list[dict]) -> tuple[list[LayerScores], list[dict]]:
    """A task's scores and rows from its conditions' work results, in the order `probe_task` gives them."""
    scores, rows = [], []
    for r in results:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in r["arrays"].items()}
        scores += [LayerScores.from_dict(d, arrays) for d in r["scores"]]
        rows += r["rows"]
    return scores, rows


def concept_depth_profile(model: Model, tasks: Sequence[Task], cache: Path, *, site: str = "paper",
                          conditions: Sequence[str] = ("clean",), cfg: ProbeConfig = DEFAULT_PROBES,
                          seq_len: int = 256, depth_params: dict | None = None, progress: bool = True,
                          checkpoint: Path | None = None, executor: ExecutorConfig | None = None):
    """A Profile with every task's curves and a `concept_depth` table.

    With `checkpoint` (a directory), each finished task is saved there at once (atomically), and a
    rerun with the same model, task data and settings reads it back instead of probing again, so an
    interrupted run resumes at the first unfinished task. The caller removes it when done.

    With an executor other than serial, every (task, condition) not finished is a work item on its workers
    (finished items kept in `checkpoint`/items), and the results are put together in the serial order."""

    def fresh(extra: dict | None = None) -> Profile:
        return Profile(model=model_card(model), data={"tasks": {t.name: t.provenance for t in tasks}},
                       meta={"lensbench": __version__,
                             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                             "analyses": {"concept_depth": {"site": site, "conditions": list(conditions),
                                                            "probe": cfg.__dict__}}, **(extra or {})})

    def table(rows: list[dict]) -> Table:
        return Table("concept_depth", rows, "concept_depth",
                     "jump and converging points per task and condition (layer index and index / L)",
                     {"depth": depth_params or {}})

    saved = None
    if checkpoint is not None and (Path(checkpoint) / "profile.json").is_file():
        try:
            saved = Profile.load(checkpoint)
        except (LensbenchError, ValueError, OSError) as exc:  # a damaged checkpoint only costs the time it saved
            print(f"lensbench: ignoring the unreadable checkpoint {checkpoint} ({exc}); probing every task",
                  file=sys.stderr)
    finished: dict[str, str] = dict(saved.meta.get("finished", {})) if saved is not None else {}
    prof, rows = fresh(), []
    part = fresh({"finished": {}})
    keys = [run_key(model, task, site, conditions, cfg, seq_len, depth_params) for task in tasks]
    done = {i for i, task in enumerate(tasks) if saved is not None and finished.get(task.name) == keys[i]}
    worked: dict[int, list[dict]] = {}
    if executor is not None and executor.kind != "serial":
        items = [[i, c] for i in range(len(tasks)) if i not in done for c in conditions]
        results = run_items(ProbeWork(tasks, cache, site, cfg, seq_len, depth_params), model, items, executor,
                            resume=Path(checkpoint) / "items" if checkpoint is not None else None,
                            key=hashlib.sha256(" ".join(keys).encode()).hexdigest()[:16])
        for (i, _), result in zip(items, results, strict=True):
            worked.setdefault(i, []).append(result)
    bar = tqdm(tasks, desc="probing", unit="task", disable=not progress, file=sys.stderr, leave=False)
    for i, task in enumerate(bar):
        bar.set_postfix(task=task.name)
        key = keys[i]
        if i in done:
            s = [v for v in saved.scores.values() if v.params.get("task") == task.name]
            r = [row for row in saved.tables["concept_depth"].rows if row["task"] == task.name]
        elif i in worked:
            s, r = _landed(worked[i])
        else:
            s, r = probe_task(model, task, cache, site=site, conditions=conditions, cfg=cfg, seq_len=seq_len,
                              depth_params=depth_params)
        prof.add(*s)
        rows += r
        if checkpoint is not None:
            part.add(*s)
            part.meta["finished"][task.name] = key
            part.add(table(rows))
            part.save(checkpoint)
    prof.add(table(rows))
    return prof
