"""The GPTQ database (EvoPress: Sieberling, Kuznedelev, Kurtic & Alistarh, 2024, arXiv 2410.14649): every linear
of every block quantised once per level with GPTQ, kept packed on disk, so allocation policies combine levels
without running GPTQ again.

    db = build(model, texts, "sm2-db", DatabaseConfig(levels=(2, 3, 4, 8)))
    db.packed("model.layers.3.mlp.down_proj", 3)       # a PackedWeight, as `apply` runs it

Every block's Hessians come from the dense model's inputs (one pass; `gptq.block_hessians` without edits), so an
entry does not depend on the levels chosen for the blocks before it and any mix of levels can be assembled; a
uniform `--method gptq` plan is sequential instead (each block sees the quantised blocks before it). The Hessians
are saved (`hessians/`), so a rebuild with more levels or other grids does not run the model again.

A folder holds:
* `hessians/L0007.safetensors`: block 7's Hessians, float32, one per distinct input (q, k and v share one);
* `levels/L0007-int3.safetensors`: block 7's linears at 3 bits: codes, scales, mins (with the `gguf` scheme the
  bytes of the GGML type the bits map to, as a GGUF file holds them: Q3_K, or Q4_0/Q5_0/Q8_0 for rows that are no
  multiple of 256);
* `items/`, `kl-items/`: the finished work items (`executor.run_items`: a killed build resumes);
* `database.json`, written last: the settings, the model card, per linear and level the GPTQ layer error
  tr(ΔW H ΔWᵀ), round-to-nearest's, tr(W H Wᵀ), ||ΔW||², tr(H) and the dampening used, and per block and level
  the measured calibration KL with only that block at that level;
* `profile/`: those as Profile scores (`gptq_nmse_*`, `hawq_*`, `gptq_kl_*`, `augmented_*`), which the bit
  policies rank by and the agreement matrix compares with the other rankings.

Every file carries the settings' key; files of other settings are never mixed in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..atomic import write_json, write_with
from ..calibration import CalibrationKL
from ..errors import PlanError
from ..executor import ExecutorConfig, run_items
from ..gpu.mixed import MixedWeight
from ..gpu.ggml import GGUF_BITS, GGMLWeight
from ..gpu.quant import BITS, PackedWeight, QuantError, check_spec
from ..gpu.reference import dequantize
from ..model import Model
from ..offload import resident
from ..profiles import LayerScores, Profile
from ..profiling import model_card
from ..simquant import block_linears, linear_inputs, linear_params, simulated
from ..units import is_conv1d
from .apply import cache_key, packed_cache
from .gptq import GPTQConfig, block_hessians, check_targets, prepare as gptq_prepare, solve, weight_of

FORMAT = "lensbench-gptq-database"
VERSION = 1
MANIFEST = "database.json"
LEVELS = BITS  # every width the packed format holds: 2, 3, 4, 5, 6, 8 (EvoPress stores these levels too)
SCHEMES = ("asym", "sym", "gguf")


def grid(group_size: int, scheme: str) -> tuple[int, str]:
    """(group size, scheme) as a database compares them: a GGUF type fixes its own blocks, so no group size."""
    return (0, scheme) if scheme == "gguf" else (int(group_size), scheme)


@dataclass(frozen=True)
class DatabaseConfig:
    """The levels and grid of a database, GPTQ's settings (`gptq.batch_size`/`seq_len` read the calibration
    text), and the calibration KL measured per block and level (`kl_texts` texts of `kl_seq_len` tokens; 0
    measures none)."""

    levels: tuple[int, ...] = LEVELS
    group_size: int = 128
    scheme: str = "asym"
    gptq: GPTQConfig = GPTQConfig()
    kl_texts: int = 8
    kl_seq_len: int = 128

    def check(self) -> "DatabaseConfig":
        if self.scheme not in SCHEMES:
            raise QuantError(f"a GPTQ database holds the {', '.join(SCHEMES)} grid, not {self.scheme!r}")
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise QuantError(f"give distinct levels, e.g. {','.join(map(str, LEVELS))}; got {self.levels}")
        for b in self.levels:
            if self.scheme != "gguf":
                check_spec(b, self.group_size)
            elif b not in GGUF_BITS:
                raise QuantError(f"level {b} has no GGUF type here; use levels among "
                                 f"{','.join(map(str, GGUF_BITS))} (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0)")
        return dataclasses.replace(self, group_size=grid(self.group_size, self.scheme)[0])


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def settings(model: Model, texts: list[str], cfg: DatabaseConfig) -> dict:
    """What a database is of: the model's weights, the grid, GPTQ's settings and the calibration text."""
    return {"format": FORMAT, "version": VERSION,
            "model": {"name": model.name, "fingerprint": model.fingerprint()},
            "levels": sorted(cfg.levels), "group_size": cfg.group_size, "scheme": cfg.scheme,
            "gptq": dataclasses.asdict(cfg.gptq),
            "calibration": {"texts": len(texts), "sha256": _sha(list(texts))},
            "kl": {"texts": cfg.kl_texts, "seq_len": cfg.kl_seq_len}}


def _hessian_path(folder: Path, layer: int) -> Path:
    return folder / "hessians" / f"L{layer:04d}.safetensors"


def _level_path(folder: Path, layer: int, bits: int) -> Path:
    return folder / "levels" / f"L{layer:04d}-int{bits}.safetensors"


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # missing, truncated or not safetensors: the file is made again
        return {}


def _hessians(folder: Path, layer: int, names: list[str]) -> dict[str, torch.Tensor]:
    """Block `layer`'s saved Hessians of the linears `names` (relative to the block)."""
    with safe_open(str(_hessian_path(folder, layer)), "pt") as f:
        shared = json.loads(f.metadata()["shared"])
        return {n: f.get_tensor(shared.get(n, n)) for n in names}


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    write_with(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), meta))


# ---------------------------------------------------------------------------------------------- build


class SolveWork:
    """One [layer, bits] item: GPTQ of the block's linears from its saved Hessians; writes the level file and
    returns each linear's errors."""

    def __init__(self, folder: str, key: str, cfg: DatabaseConfig, names: list[str]):
        self.folder, self.key, self.cfg, self.names = folder, key, cfg, names

    def setup(self, model: Model) -> None:
        self.model = model

    def run(self, item: list) -> dict:
        layer, bits = item
        folder, ad = Path(self.folder), self.model.adapter
        block = ad.blocks[layer]
        hessians = _hessians(folder, layer, self.names)
        tensors, out = {}, {}
        with resident(block):
            for rel in self.names:
                name = f"{ad.block_path(layer)}.{rel}"
                h = hessians[rel]
                r = solve(name, block.get_submodule(rel), h, bits, self.cfg.group_size, self.cfg.scheme,
                          self.cfg.gptq)
                p = r.packed
                trace = float(torch.diagonal(h).double().sum())
                out[rel] = {"error": r.error, "rtn_error": r.rtn_error, "norm": r.norm, "sq_error": r.sq_error,
                            "trace": trace, "inputs": int(h.shape[0]), "damp": r.damp, "shape": list(p.shape)}
                if isinstance(p, GGMLWeight):  # the GGUF file's bytes for it, and their type
                    tensors[f"{rel}.ggml"] = torch.from_numpy(np.ascontiguousarray(p.data))
                    out[rel]["qtype"] = p.qtype
                else:
                    tensors.update({f"{rel}.packed": p.packed, f"{rel}.scales": p.scales, f"{rel}.mins": p.mins})
                    out[rel]["group_size"] = p.group_size
        _save(_level_path(folder, layer, bits), tensors, {"key": self.key, "results": json.dumps(out)})
        return out


class KLWork:
    """One [layer, bits] item: the calibration KL with only that block at that level (from the database)."""

    def __init__(self, folder: str, doc: dict, texts: list[str], cfg: DatabaseConfig):
        self.folder, self.doc, self.texts, self.cfg = folder, doc, texts, cfg

    def setup(self, model: Model) -> None:
        self.model = model
        self.db = Database(Path(self.folder), self.doc)
        self.kl = CalibrationKL(model, self.texts, 4, self.cfg.kl_seq_len)
        self.weights = self.db.weights(model)

    def run(self, item: list) -> float:
        layer, bits = item
        ad = self.model.adapter
        targets = {f"{ad.block_path(layer)}.{n}": (bits, self.cfg.group_size, self.cfg.scheme)
                   for n in self.db.linears}
        with simulated(self.model, targets, self.weights):
            value = self.kl.changed(layer)
        self.weights.clear()  # one block at a time in memory
        return value


def _hessian_pass(model: Model, texts: list[str], folder: Path, key: str, cfg: DatabaseConfig,
                  progress: bool) -> None:
    """Every block's dense Hessians into `hessians/`, unless all are there for these settings."""
    L = model.n_layers
    if all(_metadata(_hessian_path(folder, i)).get("key") == key for i in range(L)):
        return
    ad, rel = model.adapter, block_linears(model)
    names = [f"{ad.block_path(i)}.{n}" for i in range(L) for n in rel]
    check_targets(model, names)
    bar = tqdm(total=L, desc="Hessians", unit="block", disable=not progress, file=sys.stderr, leave=False)
    for i, _, h, shared in block_hessians(model, names, texts, cfg.gptq):
        prefix = ad.block_path(i) + "."
        local = {n.removeprefix(prefix): s.removeprefix(prefix) for n, s in shared.items()}
        tensors = {n.removeprefix(prefix): t.float() for n, t in h.items() if n not in shared}
        _save(_hessian_path(folder, i), tensors, {"key": key, "shared": json.dumps(local)})
        bar.update(1)
    bar.close()


def build(model: Model, texts, out, cfg: DatabaseConfig = DatabaseConfig(), *,
          executor: ExecutorConfig | None = None, progress: bool = False) -> "Database":
    """Build (or finish) the database of `model` on calibration `texts` in folder `out`; the GPTQ items and the
    KL items run on `executor`'s workers. A rerun with the same settings does only what is missing."""
    cfg = cfg.check()
    texts = list(texts)
    if not texts:
        raise PlanError("a GPTQ database needs calibration texts")
    folder = Path(out)
    setup = settings(model, texts, cfg)
    key = _sha(setup)
    old = folder / MANIFEST
    if old.is_file():
        doc = json.loads(old.read_text())
        if doc.get("key") == key:
            return Database(folder, doc)
        raise PlanError(f"{folder} holds a GPTQ database of other settings ({_describe(doc.get('settings', {}))}; "
                        f"asked for {_describe(setup)}): give another folder")
    started = time.perf_counter()
    _hessian_pass(model, texts, folder, key, cfg, progress)
    hessian_s = time.perf_counter() - started
    names = block_linears(model)
    L, levels = model.n_layers, sorted(cfg.levels)
    items = [[i, b] for b in levels for i in range(L)]

    def sweep(desc: str, work, resume: str, lost=None) -> dict[str, list]:
        """The items' results on the executor, as {level: [one per block]}."""
        with tqdm(total=len(items), desc=desc, unit="item", disable=not progress, file=sys.stderr,
                  leave=False) as bar:
            out = run_items(work, model, items, executor, resume=folder / resume, key=key,
                            on_done=lambda *_: bar.update(1), lost=lost)
        return {str(b): out[k * L:(k + 1) * L] for k, b in enumerate(levels)}

    errors = sweep("GPTQ database", SolveWork(str(folder), key, cfg, names), "items",
                   lost=lambda j: _metadata(_level_path(folder, *items[j])).get("key") != key)
    solve_s = time.perf_counter() - started - hessian_s
    doc = {"format": FORMAT, "version": VERSION, "key": key, "settings": setup, "card": model_card(model),
           "linears": names, "linear_params": linear_params(model, 0), "linear_inputs": linear_inputs(model, 0),
           "errors": errors}
    kl_s = 0.0
    if cfg.kl_texts:
        doc["kl_block"] = sweep("database KL", KLWork(str(folder), doc, texts[:cfg.kl_texts], cfg), "kl-items")
        kl_s = time.perf_counter() - started - hessian_s - solve_s
    doc["seconds"] = {"hessians": hessian_s, "gptq": solve_s, "kl": kl_s}
    db = Database(folder, doc)
    db.profile().save(folder / "profile")
    write_json(folder / MANIFEST, doc)  # last: its presence says the database is complete
    return db


def _describe(setup: dict) -> str:
    model = setup.get("model", {})
    return (f"{model.get('name')!r} (weights {str(model.get('fingerprint'))[:12]}), levels "
            f"{','.join(map(str, setup.get('levels', [])))}, {_grid_name(setup.get('group_size'), setup.get('scheme'))}"
            f", {setup.get('calibration', {}).get('texts')} calibration texts")


def _grid_name(group_size, scheme) -> str:
    return "the GGUF types" if scheme == "gguf" else f"group {group_size} {scheme}"


# ---------------------------------------------------------------------------------------------- read


class Database:
    """A built database: its packed weights by (module name, bits), its errors and scores."""

    def __init__(self, folder: Path, doc: dict):
        self.folder, self.doc = Path(folder), doc
        self.key, self.settings = doc["key"], doc["settings"]
        self.linears: list[str] = doc["linears"]
        self.levels: list[int] = self.settings["levels"]
        self.group_size, self.scheme = self.settings["group_size"], self.settings["scheme"]
        self.n_layers = len(next(iter(doc["errors"].values())))
        block = doc["card"]["units"]["block"]  # the card's name template of a block
        self.where = {f"{block.format(i=i)}.{n}": (i, n) for i in range(self.n_layers) for n in self.linears}
        self._files: dict[tuple[int, int], dict] = {}

    @classmethod
    def open(cls, path) -> "Database":
        """The database in folder `path`; refused in one line when it is missing, unfinished or not one."""
        folder = Path(path)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            what = "is not a GPTQ database" if not (folder / "hessians").is_dir() else "is unfinished"
            raise PlanError(f"{folder} {what} (no {MANIFEST}): build it with lensbench quant-db MODEL --out "
                            f"{folder} (a rerun finishes an interrupted build)")
        try:
            doc = json.loads(manifest.read_text())
        except ValueError as exc:
            raise PlanError(f"{manifest} is not readable JSON ({exc}): build the database again") from None
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise PlanError(f"{manifest} is not a lensbench GPTQ database of version {VERSION}: build it again "
                            f"with lensbench quant-db")
        return cls(folder, doc)

    @property
    def model(self) -> dict:
        return self.settings["model"]

    def describe(self) -> str:
        return _describe(self.settings)

    def check(self, fingerprint: str | None, name: str | None, group_size: int, scheme: str) -> None:
        """Refuse a database of another model or grid, naming both."""
        mine = self.model
        if mine["fingerprint"] != fingerprint:
            raise PlanError(f"the GPTQ database {self.folder} is of {mine['name']!r} (weights "
                            f"{mine['fingerprint'][:12]}), not of {name!r} (weights {str(fingerprint)[:12]}): build "
                            f"one for this model with lensbench quant-db")
        if grid(group_size, scheme) != (self.group_size, self.scheme):
            fix = (f"--scheme {self.scheme}" if self.scheme == "gguf"
                   else f"--group-size {self.group_size} --scheme {self.scheme}")
            raise PlanError(f"the GPTQ database {self.folder} holds GPTQ on {self.grid_name}, not the "
                            f"{_grid_name(group_size, scheme)} asked for: give {fix}, or build a database on that "
                            f"grid")

    def check_bits(self, bits) -> None:
        missing = sorted(set(bits) - set(self.levels))
        if missing:
            raise PlanError(f"the GPTQ database {self.folder} holds levels {','.join(map(str, self.levels))}, not "
                            f"{','.join(map(str, missing))}: choose --levels among them, or build it with them")

    def _file(self, layer: int, bits: int) -> dict:
        if (layer, bits) not in self._files:
            path = _level_path(self.folder, layer, bits)
            if _metadata(path).get("key") != self.key:
                raise PlanError(f"{path} is missing or of other settings: build the database again")
            with safe_open(str(path), "pt") as f:
                meta = json.loads(f.metadata()["results"])
                self._files[(layer, bits)] = {"meta": meta, "tensors": {k: f.get_tensor(k) for k in f.keys()}}
        return self._files[(layer, bits)]

    def _where(self, name: str) -> tuple[int, str]:
        if name not in self.where:
            raise PlanError(f"{name} is not in the GPTQ database {self.folder} (it holds the blocks' linears)")
        return self.where[name]

    @property
    def grid_name(self) -> str:
        return _grid_name(self.group_size, self.scheme)

    def packed(self, name: str, bits: int) -> PackedWeight | GGMLWeight:
        """The packed weight of module `name` (its full name in the model) at `bits` (with the `gguf` scheme, the
        bytes of its GGML type)."""
        self.check_bits([bits])
        layer, rel = self._where(name)
        f = self._file(layer, bits)
        t, meta = f["tensors"], f["meta"][rel]
        if "qtype" in meta:
            return GGMLWeight(meta["qtype"], t[f"{rel}.ggml"].numpy(), tuple(meta["shape"]))
        return PackedWeight(t[f"{rel}.packed"], t[f"{rel}.scales"], t[f"{rel}.mins"], bits, meta["group_size"],
                            tuple(meta["shape"]))

    def hessian(self, name: str) -> torch.Tensor:
        """The saved calibration Hessian of module `name` (from the dense model's inputs)."""
        layer, rel = self._where(name)
        if _metadata(_hessian_path(self.folder, layer)).get("key") != self.key:
            raise PlanError(f"{_hessian_path(self.folder, layer)} is missing or of other settings: build the "
                            f"database again")
        return _hessians(self.folder, layer, [rel])[rel]

    def mixed(self, name: str, module, group_bits) -> MixedWeight:
        """GPTQ of module `name` with one width per input group (BAQ's allocation) from its saved Hessian: what
        the levels would hold if the database had that level (same Hessian, grid and GPTQ settings)."""
        if self.scheme == "gguf":
            raise PlanError(f"{name}: one width per input group (BAQ) needs the asym or sym grid; the GPTQ database "
                            f"{self.folder} holds the GGUF types, one per linear")
        self.check_bits(set(group_bits))
        r = solve(name, module, self.hessian(name), list(group_bits), self.group_size, self.scheme,
                  GPTQConfig(**self.settings["gptq"]))
        return r.packed

    def weights(self, model: Model) -> "Dequantised":
        return Dequantised(self, model)

    def fill(self, model: Model, targets: dict) -> list[str]:
        """Put the database's packed weights for `targets` ({module name: Quant}, method gptq) where `apply`
        finds them (the model's packed cache); returns the names filled."""
        cache, root, done = packed_cache(model), model.module, []
        for name, spec in targets.items():
            self.check_bits([spec.bits])
            if grid(spec.group_size, spec.scheme) != (self.group_size, self.scheme):
                raise PlanError(f"{name}: the plan asks for {_grid_name(spec.group_size, spec.scheme)}, the GPTQ "
                                f"database {self.folder} holds {self.grid_name}")
            module = root.get_submodule(name)
            cache[cache_key(name, weight_of(module), spec)] = (self.mixed(name, module, spec.group_bits)
                                                                if spec.group_bits else self.packed(name, spec.bits))
            done.append(name)
        return done

    def table(self, bits: int, field: str) -> np.ndarray:
        """[layers, linears] of one recorded quantity at `bits`."""
        rows = self.doc["errors"][str(bits)]
        return np.array([[row[n][field] for n in self.linears] for row in rows], dtype=np.float64)

    def profile(self) -> Profile:
        """The database's measurements as Profile scores, per level b:
        `gptq_nmse_block_int{b}` and `gptq_nmse_linear_int{b}` (tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), summed over a block's
        linears before dividing: EvoPress's DP input), `hawq_block_int{b}` and `hawq_linear_int{b}` (Σ tr(H)/n ·
        ||ΔW||², HAWQ-v2's trace score with the exact trace), `gptq_kl_block_int{b}` (the measured calibration KL
        with only that block at b) and `augmented_block_int{b}` (the Hessian term plus the end-to-end KL, each
        divided by its sum over blocks: Schaefer et al., 2023, arXiv 2306.04879, in our reading)."""
        card = {**self.doc["card"]}
        common = {"group_size": self.group_size, "scheme": self.scheme, "database": self.key[:16],
                  "linears": self.linears, "linear_params": self.doc["linear_params"],
                  "linear_inputs": self.doc["linear_inputs"]}
        scores = []
        for b in self.levels:
            err, norm = self.table(b, "error"), self.table(b, "norm")
            hawq = self.table(b, "trace") / self.table(b, "inputs") * self.table(b, "sq_error")
            p = {**common, "bits": b}
            scores += [
                LayerScores(f"gptq_nmse_block_int{b}", err.sum(1) / np.maximum(norm.sum(1), 1e-30), True,
                            analysis="quant-db", description=f"GPTQ int{b}: tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) over the block's "
                            f"linears", params=p),
                LayerScores(f"gptq_nmse_linear_int{b}", err / np.maximum(norm, 1e-30), True, ("layer", "linear"),
                            "quant-db", f"GPTQ int{b}: tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) per linear", p),
                LayerScores(f"hawq_block_int{b}", hawq.sum(1), True, analysis="quant-db",
                            description=f"HAWQ trace score at int{b}: Σ tr(H)/n ||ΔW||² over the block's linears",
                            params=p),
                LayerScores(f"hawq_linear_int{b}", hawq, True, ("layer", "linear"), "quant-db",
                            f"HAWQ trace score at int{b} per linear", p)]
            if "kl_block" in self.doc:
                kl = np.array(self.doc["kl_block"][str(b)], dtype=np.float64)
                h = hawq.sum(1)
                scores += [
                    LayerScores(f"gptq_kl_block_int{b}", kl, True, analysis="quant-db",
                                description=f"calibration KL with only this block at GPTQ int{b}", params=p),
                    LayerScores(f"augmented_block_int{b}", h / max(h.sum(), 1e-30) + kl / max(kl.sum(), 1e-30), True,
                                analysis="quant-db", description=f"HAWQ term + end-to-end KL at int{b}, each over "
                                f"its sum", params=p)]
        profile = Profile(card, {"calibration": self.settings["calibration"]},
                          meta={"analyses": {"quant-db": {"folder": str(self.folder), "key": self.key}}})
        profile.add(*scores)
        return profile


class Dequantised:
    """The database's weights as `simquant.simulated` reads them ({(module name, grid): dense tensor}); a grid
    the database does not hold is refused, never rounded to nearest instead."""

    def __init__(self, db: Database, model: Model):
        self.db, self.root, self.values = db, model.module, {}

    def get(self, key, default=None):
        if key not in self.values:
            name, spec = key
            bits, group_size, scheme = tuple(spec)[:3]
            if grid(group_size, scheme) != (self.db.group_size, self.db.scheme):
                raise PlanError(f"the GPTQ database holds {self.db.grid_name}, not "
                                f"{_grid_name(group_size, scheme)}")
            module = self.root.get_submodule(name)
            widths = getattr(spec, "group_bits", ())  # a plan's Quant with one width per input group (BAQ)
            pw = self.db.mixed(name, module, widths) if widths else self.db.packed(name, bits)
            q = dequantize(pw).to(module.weight.dtype)
            self.values[key] = q.T if is_conv1d(module) else q
        return self.values[key]

    def clear(self) -> None:
        self.values.clear()


def prepare(model: Model, bound, texts, cfg: GPTQConfig | None = None, progress: bool = False) -> dict:
    """The packed weights of a bound plan's `gptq` entries where `apply` finds them: from the GPTQ database the
    plan was measured on (recorded in its meta), else by running GPTQ on calibration `texts` (`gptq.prepare`)."""
    record = bound.plan.meta.get("database")
    targets = {n: q for n, q in bound.quant.items() if q.method == "gptq"}
    if not record or not targets:
        return gptq_prepare(model, bound, texts, cfg or GPTQConfig(), progress)
    folder = Path(record["folder"])
    if not (folder / MANIFEST).is_file():
        raise PlanError(f"the plan's GPTQ levels come from the database {folder}, which is not there: rebuild it "
                        f"with lensbench quant-db, or give --method gptq to run GPTQ afresh")
    db = Database.open(folder)
    if db.key != record["key"]:
        raise PlanError(f"the GPTQ database {folder} was rebuilt with other settings after the plan was made: make "
                        f"the plan again, or give --method gptq to run GPTQ afresh")
    db.check(model.fingerprint(), model.name, db.group_size, db.scheme)
    return {"layers": len(db.fill(model, targets)), "database": str(folder)}
