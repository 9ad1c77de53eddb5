"""`LayerScores` and `Profile`: analysis results with provenance, saved as versioned JSON.

On disk a Profile is `profile.json` (schema `lensbench.profile/1`; 1-D scores inline so people
and other tools can read them) plus `profile.arrays-<content hash>.safetensors` for matrices, named by the
JSON's stem so two profiles in one directory never share a file. The sidecar is written first, the JSON last
(naming the sidecar and its hash), and the previous sidecar is removed only after that: a kill at any point
leaves the old profile or the new one. Loading validates everything and never executes code (JSON +
safetensors, no pickle).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json, write_with, write_text
from . import jsonio
from .errors import ProfileError
from safetensors.numpy import save_file
from safetensors.numpy import load_file

SCHEMA = "lensbench.profile/1"
INLINE_MAX = 4096  # arrays up to this many elements are written inline in the JSON


@dataclass(frozen=True)
class LayerScores:
    """One metric over units (layers, sublayers or heads), with the direction spelled out.

    `higher_is_more_important`: True or False for metrics that rank units, None for descriptive
    ones (a matrix, a signed cosine). Rankings are derived from values, never stored by hand.
    """

    name: str
    values: np.ndarray
    higher_is_more_important: bool | None
    axes: tuple[str, ...] = ("layer",)
    analysis: str = ""
    description: str = ""
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        values = np.asarray(self.values, dtype=np.float64)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "axes", tuple(self.axes))
        if values.ndim != len(self.axes):
            raise ValueError(f"{self.name}: values have {values.ndim} dims but axes are {self.axes}")

    def ranking(self) -> list[int]:
        """Unit indices, most important first (ties keep index order)."""
        if self.values.ndim != 1 or self.higher_is_more_important is None:
            raise ValueError(f"{self.name} is descriptive, not a ranking (higher_is_more_important is None)")
        key = -self.values if self.higher_is_more_important else self.values
        key = np.where(np.isnan(key), np.inf, key)
        return [int(i) for i in np.argsort(key, kind="stable")]

    def to_frame(self):
        import pandas as pd  # heavy: pandas, only for tables

        if self.values.ndim == 1:
            frame = pd.DataFrame({self.axes[0]: np.arange(len(self.values)), self.name: self.values})
            if self.higher_is_more_important is not None:
                rank = np.empty(len(self.values), dtype=int)
                rank[self.ranking()] = np.arange(len(self.values))
                frame["rank"] = rank
            return frame
        return pd.DataFrame(self.values, index=pd.Index(range(self.values.shape[0]), name=self.axes[0]))

    def plot(self):
        """A plotly figure: bars over units for 1-D scores, a heatmap for matrices."""
        import plotly.graph_objects as go  # heavy: plotly, only for figures

        if self.values.ndim == 1:
            fig = go.Figure(go.Bar(x=list(range(len(self.values))), y=self.values))
            fig.update_layout(xaxis_title=self.axes[0], yaxis_title=self.name)
        else:
            fig = go.Figure(go.Heatmap(z=self.values))
            fig.update_layout(xaxis_title=self.axes[1], yaxis_title=self.axes[0])
        fig.update_layout(title=f"{self.name} ({self.analysis})")
        return fig

    def __repr__(self) -> str:
        direction = {True: "higher=more important", False: "lower=more important", None: "descriptive"}
        v = self.values
        shown = np.array2string(v, precision=4, threshold=8) if v.ndim == 1 else f"{v.shape} matrix"
        return f"LayerScores({self.name!r}, {direction[self.higher_is_more_important]}, {shown})"

    def to_dict(self, arrays: dict[str, np.ndarray]) -> dict:
        d = {"name": self.name, "analysis": self.analysis, "description": self.description,
             "higher_is_more_important": self.higher_is_more_important, "axes": list(self.axes),
             "params": self.params, "shape": list(self.values.shape)}
        if self.values.size <= INLINE_MAX and self.values.ndim == 1:
            d["values"] = [None if not math.isfinite(x) else float(x) for x in self.values]
        else:
            arrays[self.name] = self.values
            d["values"] = {"sidecar": self.name}
        return d

    @classmethod
    def from_dict(cls, d: dict, arrays: dict[str, np.ndarray]) -> "LayerScores":
        values = d["values"]
        if isinstance(values, dict):
            values = arrays[values["sidecar"]]
        else:
            values = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
        if list(values.shape) != list(d["shape"]):
            raise ValueError(f"values of {d['name']} have shape {list(values.shape)}, header says {d['shape']}")
        return cls(d["name"], values, d["higher_is_more_important"], tuple(d["axes"]), d.get("analysis", ""),
                   d.get("description", ""), d.get("params", {}))


@dataclass(frozen=True)
class Table:
    """A result that is a list of records rather than values over units (e.g. channel-graph edges)."""

    name: str
    rows: list
    analysis: str = ""
    description: str = ""
    params: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd  # heavy: pandas, only for tables

        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict:
        return {"name": self.name, "analysis": self.analysis, "description": self.description,
                "params": self.params, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict) -> "Table":
        if not isinstance(d.get("rows"), list) or not all(isinstance(r, dict) for r in d["rows"]):
            raise ValueError("rows must be a list of objects")
        return cls(d["name"], d["rows"], d.get("analysis", ""), d.get("description", ""), d.get("params", {}))


@dataclass
class Profile:
    """A model's card plus every analysis result: per-layer scores (`LayerScores`) and tables.

        >>> path = profile.save(tmp / "profile")
        >>> again = lb.Profile.load(path, model=model)      # refused for another model's weights
        >>> sorted(again.scores) == sorted(profile.scores)
        True
    """

    model: dict
    data: dict = field(default_factory=dict)
    scores: dict[str, LayerScores] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)

    def add(self, *results: "LayerScores | Table") -> None:
        for r in results:
            (self.tables if isinstance(r, Table) else self.scores)[r.name] = r

    def merge(self, other: "Profile") -> None:
        """Take `other`'s results (same model), replacing results of the same name."""
        self.check_fingerprint(other.model.get("fingerprint"), other.model.get("name"))
        self.scores.update(other.scores)
        self.tables.update(other.tables)
        self.data = {**self.data, **other.data}
        self.meta = {**self.meta, **other.meta,
                     "analyses": {**self.meta.get("analyses", {}), **other.meta.get("analyses", {})}}

    def __getitem__(self, name: str) -> LayerScores:
        try:
            return self.scores[name]
        except KeyError:
            raise KeyError(f"no scores named {name!r}; this profile has: {', '.join(self.scores)}") from None

    def to_frame(self):
        """One row per layer, one column per 1-D per-layer metric."""
        import pandas as pd  # heavy: pandas, only for tables

        cols = {n: s.values for n, s in self.scores.items() if s.values.ndim == 1 and s.axes == ("layer",)}
        n = max((len(v) for v in cols.values()), default=0)
        frame = pd.DataFrame({k: np.pad(v, (0, n - len(v)), constant_values=np.nan) for k, v in cols.items()})
        frame.index.name = "layer"
        return frame

    def to_table(self, path: str | Path) -> Path:
        """Write the per-layer table as CSV or parquet (by extension), atomically."""
        path = Path(path)
        frame = self.to_frame()
        if path.suffix == ".parquet":
            try:
                import pyarrow  # noqa: F401  # optional: pyarrow (the parquet extra)
            except ImportError:
                raise ProfileError("writing parquet needs pyarrow: pip install 'lensbench[parquet]'") from None
            write_with(path, lambda tmp: frame.to_parquet(tmp))
        elif path.suffix == ".csv":
            write_text(path, frame.to_csv())
        else:
            raise ProfileError(f"unknown table format {path.suffix!r}: use a .csv or .parquet file name")
        return path

    # --- I/O -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `profile.json` (+ sidecar) into a directory, or to the given .json path."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "profile.json"
        arrays: dict[str, np.ndarray] = {}
        doc = {"schema": SCHEMA, "model": self.model, "data": self.data, "meta": self.meta,
               "scores": {n: s.to_dict(arrays) for n, s in self.scores.items()},
               "tables": {n: t.to_dict() for n, t in self.tables.items()}}
        keep = None
        if arrays:
            keep, sha = _write_sidecar(path, arrays)
            doc["sidecar"] = {"file": keep.name, "sha256": sha}
        write_json(path, doc)  # last: the JSON names its sidecar and the sidecar's hash
        # Only now that the new JSON is in place: this JSON's earlier sidecars, and the temporaries a killed
        # save left (`.profile.json.*.tmp`, `.profile.arrays.tmp` and its own temporary).
        for old in path.parent.glob(f"{path.stem}.arrays-*.safetensors"):
            if old != keep:
                old.unlink(missing_ok=True)
        for left in [*path.parent.glob(f".{path.stem}.*tmp"), *path.parent.glob(f"..{path.stem}.*tmp")]:
            left.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, fix: str = "profile the model you are using") -> "Profile":
        """Read and validate a profile; with `model`, also check it was measured on that model (`fix` is what the
        error tells the user to do when it was not)."""
        path = Path(path)
        if path.is_dir():
            path = path / "profile.json"
        if not path.is_file():
            raise ProfileError(f"profile {path} does not exist: run `lensbench profile MODEL --out DIR` first")
        doc = jsonio.read_document(path, ProfileError, "re-run lensbench profile")
        profile = cls._from_doc(doc, path)
        if model is not None:
            try:
                profile.check_model(model, fix)
            except ProfileError as exc:
                raise ProfileError(f"{path}: {exc}") from None
        return profile

    @classmethod
    def _from_doc(cls, doc: Any, path: Path) -> "Profile":
        if not isinstance(doc, dict) or "schema" not in doc:
            raise ProfileError(f"{path} is not a lensbench profile (no 'schema' field)")
        if doc["schema"] != SCHEMA:
            raise ProfileError(f"{path} has schema {doc['schema']!r}; this lensbench reads {SCHEMA!r}: "
                               f"re-run lensbench profile with this version")
        for key, kind in (("model", dict), ("scores", dict)):
            if not isinstance(doc.get(key), kind):
                raise ProfileError(f"{path} is missing its {key!r} section: re-run lensbench profile")
        arrays = {}
        if "sidecar" in doc:
            arrays = _read_sidecar(path.parent / doc["sidecar"]["file"], doc["sidecar"]["sha256"])
        scores = {}
        for name, d in doc["scores"].items():
            try:
                scores[name] = LayerScores.from_dict(d, arrays)
            except (KeyError, TypeError, ValueError) as exc:
                raise ProfileError(f"{path}: scores {name!r} are malformed ({exc}): re-run lensbench profile") from None
        tables = {}
        for name, d in doc.get("tables", {}).items():
            try:
                tables[name] = Table.from_dict(d)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ProfileError(f"{path}: table {name!r} is malformed ({exc}): re-run lensbench profile") from None
        return cls(doc["model"], doc.get("data", {}), scores, doc.get("meta", {}), tables)

    def check_model(self, model, fix: str = "profile the model you are using") -> None:
        self.check_fingerprint(model.fingerprint(), model.name, fix)

    def check_fingerprint(self, fingerprint: str | None, name: str | None,
                          fix: str = "profile the model you are using") -> None:
        mine = self.model.get("fingerprint")
        if mine != fingerprint:
            raise ProfileError(f"this profile was measured on {self.model.get('name')!r} "
                               f"(weights {str(mine)[:12]}), not on {name!r} (weights "
                               f"{str(fingerprint)[:12]}): {fix}")

    def __repr__(self) -> str:
        tables = f", tables: {', '.join(self.tables)}" if self.tables else ""
        return f"Profile({self.model.get('name')!r}, {len(self.scores)} scores: {', '.join(self.scores)}{tables})"


def _write_sidecar(json_path: Path, arrays: dict[str, np.ndarray]) -> tuple[Path, str]:
    """The arrays in `<json stem>.arrays-<content hash>.safetensors` beside the JSON, and that hash: two profiles
    in one directory never share a file, and a new save never overwrites the sidecar the current JSON names."""

    tmp = json_path.parent / f".{json_path.stem}.arrays.tmp"
    write_with(tmp, lambda t: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(t)))
    sha = _sha256(tmp)
    final = json_path.parent / f"{json_path.stem}.arrays-{sha[:16]}.safetensors"
    os.replace(tmp, final)
    return final, sha


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_sidecar(path: Path, sha: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ProfileError(f"{path} is missing; it holds this profile's matrices: copy it with profile.json")
    if _sha256(path) != sha:
        raise ProfileError(f"{path} does not match profile.json (hash differs): the pair was torn or edited; "
                           f"re-run lensbench profile")

    return load_file(str(path))
