"""On-disk activation store for long runs: one safetensors chunk per batch, memory bounded by a batch.

Layout of a store directory:
    manifest.json           schema, the capture settings (and their hash), the finished chunks
    chunk-000000.safetensors  tensors of one batch: each site as [n_tokens, d] (positions="all",
                              padding dropped) or [n_texts, d], plus token_ids/text_index/position

Each chunk is written atomically and only then entered in the manifest (also written atomically, by the
driver alone), so a run killed at any moment resumes with the batches the manifest does not list, and
several workers can write chunks of one store at once (`capture_to_store(executor=...)`).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .adapters import SITES
from .atomic import write_json, write_with
from .capture import CaptureSpec, capture_batch, batches
from . import jsonio
from .errors import LensbenchError
from .executor import ExecutorConfig, run_items
from .model import Model

SCHEMA = "lensbench.store/1"


class ActivationStore:
    """A directory of captured activation chunks; see the module docstring."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise LensbenchError(f"{self.root} is not an activation store (no manifest.json)")
        try:
            self.manifest = jsonio.read(path)
        except jsonio.NonFinite as exc:
            raise LensbenchError(f"{path}: {exc.field} is {exc.literal}, which lensbench never writes: delete the "
                                 f"store and capture again") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LensbenchError(f"{path} is not valid JSON ({exc}): delete the store and capture again") from None
        if self.manifest.get("schema") != SCHEMA:
            raise LensbenchError(f"{path} has schema {self.manifest.get('schema')!r}, expected {SCHEMA!r}")

    @classmethod
    def open(cls, root: str | Path, config: dict) -> "ActivationStore":
        """Open the store at `root` for a run with `config`, creating it if needed."""
        root = Path(root)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        if not (root / "manifest.json").exists():
            write_json(root / "manifest.json", {"schema": SCHEMA, "config": config, "config_sha256": digest,
                                                "chunks": {}, "complete": False})
        store = cls(root)
        if store.manifest["config_sha256"] != digest:
            old = store.manifest.get("config", {})
            diff = [k for k in sorted(set(config) | set(old)) if config.get(k) != old.get(k)]
            shown = "; ".join(f"{k} {_short(old.get(k))} there, {_short(config.get(k))} here" for k in diff[:3])
            raise LensbenchError(f"the store at {root} was captured with other settings ({shown}): use another "
                                 f"--out directory, the same settings, or delete this one")
        for left in [*root.glob(".chunk-*.tmp"), *root.glob(".manifest.json.*.tmp")]:  # what a killed run was
            left.unlink(missing_ok=True)  # writing: never named by the manifest, which is replaced whole
        return store

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def has(self, index: int) -> bool:
        return str(index) in self.manifest["chunks"]

    def enter(self, index: int, name: str, n_tokens: int) -> None:
        """List a chunk file (already written in place) in the manifest."""
        self.manifest["chunks"][str(index)] = {"file": name, "n_tokens": n_tokens}
        write_json(self.root / "manifest.json", self.manifest)

    def mark_complete(self) -> None:
        self.manifest["complete"] = True
        write_json(self.root / "manifest.json", self.manifest)

    @property
    def n_tokens(self) -> int:
        return sum(c["n_tokens"] for c in self.manifest["chunks"].values())

    def chunks(self, names: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Chunks in order, each loaded on its own (only `names` if given)."""
        for key in sorted(self.manifest["chunks"], key=int):
            with safe_open(str(self.root / self.manifest["chunks"][key]["file"]), framework="pt") as fh:
                yield {k: fh.get_tensor(k) for k in (names or fh.keys())}

    def load(self, name: str) -> torch.Tensor:
        """One tensor concatenated over all chunks (mind the size)."""
        return torch.cat([c[name] for c in self.chunks([name])])


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class CaptureWork:
    """Capture one batch into its chunk file (a work item is a batch index). Chunk files are distinct per
    batch and written atomically, so any number of workers write shards of one store at once without a lock;
    only the driver writes the manifest, after the chunk is in place. On a cluster, the store's folder must be
    one that every worker sees (a shared filesystem)."""

    root: str
    texts: list[str]
    spec: CaptureSpec
    batch_size: int
    seq_len: int | None

    def setup(self, model: Model) -> None:
        self.model_ = model
        self.batches_ = list(batches(model, self.texts, self.batch_size, self.seq_len))

    def run(self, index: int) -> dict:
        batch = self.batches_[index]
        trace, _ = capture_batch(self.model_, self.spec, batch)
        B, T = batch.input_ids.shape
        if self.spec.positions == "all":
            keep = batch.attention_mask.bool()
            tensors = {k: v[keep] for k, v in trace.activations.items()}
            tensors["token_ids"] = batch.input_ids[keep]
            tensors["position"] = torch.arange(T).expand(B, T)[keep]
            tensors["text_index"] = (torch.arange(B)[:, None] + index * self.batch_size).expand(B, T)[keep]
        else:
            tensors = dict(trace.activations)
            tensors["text_index"] = torch.arange(B) + index * self.batch_size
        name = chunk_name(index)
        write_with(Path(self.root) / name,
                   lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
        return {"file": name, "n_tokens": batch.n_tokens}


def capture_to_store(model: Model, texts: Sequence[str], root: str | Path, *, sites: Sequence[str] = SITES,
                     layers: Sequence[int] | None = None, positions: str = "all", batch_size: int = 8,
                     seq_len: int | None = 128, dtype: torch.dtype = torch.float16, progress: bool = True,
                     after_chunk: Callable[[int], None] | None = None,
                     executor: ExecutorConfig | None = None) -> ActivationStore:
    """Capture `texts` batch by batch into a store at `root`; rerun the same call to resume. With an
    `executor`, workers capture batches in parallel, each writing its own chunk file; the store equals the
    serial one."""
    spec = CaptureSpec(tuple(sites), None if layers is None else tuple(layers), positions, dtype).validate(model)
    config = {"model": model.fingerprint(), "model_name": model.name, "n_texts": len(texts),
              "texts_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
              "sites": list(spec.sites), "layers": list(spec.layers), "positions": positions,
              "batch_size": batch_size, "seq_len": seq_len, "dtype": str(dtype).replace("torch.", "")}
    store = ActivationStore.open(root, config)
    todo = [i for i in range(math.ceil(len(texts) / batch_size)) if not store.has(i)]
    bar = tqdm(total=len(texts), desc=f"capturing {model.name}", unit="text", disable=not progress, file=sys.stderr)
    bar.update(min(len(texts), (math.ceil(len(texts) / batch_size) - len(todo)) * batch_size))

    def entered(j: int, chunk: dict) -> None:  # the driver alone writes the manifest, after the chunk
        store.enter(todo[j], chunk["file"], chunk["n_tokens"])
        bar.update(min(batch_size, len(texts) - todo[j] * batch_size))
        if after_chunk is not None:
            after_chunk(todo[j])

    run_items(CaptureWork(str(store.root), list(texts), spec, batch_size, seq_len), model, todo, executor,
              on_done=entered)
    bar.close()
    store.mark_complete()
    return store
