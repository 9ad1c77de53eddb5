"""Resumable profiling: the analyzers' running state after each finished batch, in one safetensors file.

An analyzer's state is its attributes that end in `_` (the dataclass convention for what `start` and
`update` build): tensors, numpy arrays, numbers, dicts of tensors and torch generators are saved; the
model and anything `start` derives from it (unit lists, names) are rebuilt by `start`. An analyzer that
keeps something else after a batch (geometry keeps a replayable batch) makes the run not resumable, and
no checkpoint is written for it.

The file is written atomically and holds its own key (model fingerprint, texts, analyses and their
parameters, batch size, sequence length): a checkpoint of another run is ignored, never mixed in.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .atomic import write_with
from safetensors.torch import save_file
from safetensors import safe_open

SKIP = {"model_", "on_step_"}


def run_key(model, texts, analyzers, batch_size: int, seq_len: int) -> str:
    doc = {"model": model.fingerprint(), "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
           "analyses": [[a.name, a.params()] for a in analyzers], "batch_size": batch_size, "seq_len": seq_len}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _savable(v) -> bool:
    return (isinstance(v, (torch.Tensor, np.ndarray, torch.Generator, bool, int, float))
            or (isinstance(v, dict) and all(isinstance(x, torch.Tensor) for x in v.values())))


def derived(analyzer) -> set[str]:
    """Attributes `start` made that are not state (rebuilt by `start` on resume)."""
    return {k for k, v in vars(analyzer).items() if k.endswith("_") and k not in SKIP and not _savable(v)}


def snapshot(analyzers, derived_keys: list[set[str]]) -> tuple[dict, dict] | None:
    """(tensors, scalars) of every analyzer's state, or None when one holds state that cannot be saved."""
    tensors, meta = {}, {}
    for i, (a, base) in enumerate(zip(analyzers, derived_keys, strict=True)):
        for k, v in vars(a).items():
            if not k.endswith("_") or k in SKIP or k in base:
                continue
            name = f"{i}.{k}"
            if isinstance(v, torch.Generator):
                tensors[name], meta[name] = v.get_state(), "generator"
            elif isinstance(v, torch.Tensor):
                tensors[name], meta[name] = v.detach().cpu().contiguous(), "tensor"
            elif isinstance(v, np.ndarray):
                tensors[name], meta[name] = torch.from_numpy(np.ascontiguousarray(v)), "ndarray"
            elif isinstance(v, dict) and all(isinstance(x, torch.Tensor) for x in v.values()):
                for kk, x in v.items():
                    tensors[f"{name}.{kk}"] = x.detach().cpu().contiguous()
                meta[name] = {"dict": list(v)}
            elif isinstance(v, (bool, int, float)):
                meta[name] = {"value": v}
            else:
                return None
    return tensors, meta


def save(path: Path, key: str, batches_done: int, n_tokens: int, state: tuple[dict, dict]) -> None:

    tensors, meta = state
    header = {"key": key, "batches_done": str(batches_done), "n_tokens": str(n_tokens), "state": json.dumps(meta)}
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load(path: Path, key: str, analyzers) -> tuple[int, int] | None:
    """Restore the analyzers from a checkpoint of this run: (batches done, tokens seen), or None."""

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            if header.get("key") != key:
                return None
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(header["state"])
        done, n_tokens = int(header["batches_done"]), int(header["n_tokens"])
    except Exception:  # a damaged checkpoint is only lost time: start over
        return None
    for name, kind in meta.items():
        i, attr = name.split(".", 1)
        a = analyzers[int(i)]
        if kind == "generator":
            gen = torch.Generator()
            gen.set_state(tensors[name])
            setattr(a, attr, gen)
        elif kind == "tensor":
            setattr(a, attr, tensors[name])
        elif kind == "ndarray":
            setattr(a, attr, tensors[name].numpy().copy())
        elif "dict" in kind:
            setattr(a, attr, {kk: tensors[f"{name}.{kk}"] for kk in kind["dict"]})
        else:
            setattr(a, attr, kind["value"])
    return done, n_tokens
