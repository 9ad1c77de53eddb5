"""Save a planned model as a checkpoint other tools load: `compress(model, plan, format=..., out=...)`.

Formats are registered writers (`@register(name)` in `formats.registry`), each a function
`(model, plan, staging, dtype) -> record` that writes into an empty staging folder; `compress` checks
everything first, stages the files in a hidden sibling of `out` and publishes them with one rename, so a
kill or a full disk never leaves a half checkpoint at `out`. Every folder also gets `lensbench-compress.json`: the plan,
the source model, and per tensor the type stored and its bits per weight.

    hf                 transformers checkpoint (blocks dropped and renumbered; quantised weights
                       stored dequantised); a plan that removes sublayers gets lensbench's own layout
    gguf               llama.cpp's file: per-tensor GGML types, dropped blocks renumbered
    compressed-tensors pack-quantized int weights that vLLM and transformers load
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..atomic import publish_dir, staging_dir, tidy_beside, write_json
from ..errors import LensbenchError
from ..load import load
from ..saved import RECORD
from ..texts import bbc_news
from .formats import FORMATS
from .database import prepare
from .plan import Plan

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
@dataclass
class Saved:
    """What `compress` wrote: the folder, the format, and its record (tensor types, bytes, bits)."""

    path: Path
    format: str
    record: dict

    def __repr__(self) -> str:
        r = self.record
        return (f"Saved({str(self.path)!r}, {self.format}, {r['files_bytes'] / 1e6:.1f} MB, "
                f"{r.get('bits_per_weight', 0):.3g} bits per weight)")


def check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LensbenchError(f"--out {out} is a file; give a folder path for the checkpoint")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LensbenchError(f"--out {out} exists and is not empty: pass --overwrite to replace it, or choose "
                             f"another folder")
    return out


def compress(model, plan: Plan, *, format: str = "hf", out: str | os.PathLike, dtype: str | None = None,
             overwrite: bool = False, calibration: Sequence[str] | None = None) -> Saved:
    """Write `plan` applied to `model` as a `format` checkpoint at `out` (`lensbench.compress`); see the module
    docstring.

        >>> saved = lb.compress(model, plan, format="hf", out=tmp / "pruned")
        >>> (saved.path / "config.json").is_file() and lb.load(saved.path).n_layers == model.n_layers - 1
        True
    """
    if format not in FORMATS:
        raise LensbenchError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise LensbenchError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out = Path(out)
    tidy_beside(out)  # a checkpoint moved aside by a killed run goes back before `out` is checked
    out = check_out(out, overwrite)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    model = load(model)
    bound = plan.bind(model)  # another model's plan, unknown names: refused before anything is written
    if any(q.method == "gptq" for q in bound.quant.values()):  # GPTQ entries: on calibration text, never held-out
        prepare(model, bound, calibration or bbc_news("calibration", limit=128), progress=True)
    staging = staging_dir(out)
    try:
        with torch.no_grad():
            record = FORMATS[format](model, plan, staging, DTYPES[dtype] if dtype else None)
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
        record = {"schema": "lensbench.compress/1", "format": format,
                  "source": {k: model.card.get(k) for k in ("name", "source", "fingerprint") if model.card.get(k)},
                  "plan": plan.to_dict(), "files": files, "files_bytes": sum(files.values()), **record}
        if bound.kv:
            record["kv_cache"] = {
                "layers": {str(i): kv.name for i, kv in bound.kv.items()},
                "note": "a run-time setting, not stored in the checkpoint's tensors: lensbench applies it from "
                        "this record's plan (lb.apply); llama.cpp takes one type for every layer "
                        "(--cache-type-k / --cache-type-v)"}
        write_json(staging / RECORD, record)
        publish_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Saved(out, format, record)
