"""The bit-allocation study on GPTQ levels: at each average-bits budget, uniform bits, bits-rank with each ranking
(LayerwiseQuant's LIM and ZD, the GPTQ database's Hessian NMSE, HAWQ trace, augmented and measured KL), its
reverse, random orders (mean of 3), the knapsack DP on NMSE (EvoPress's baseline) and on measured KL, the
evolutionary search and BAQ (`bits-baq`), every plan's weights taken from one GPTQ database (`lensbench quant-db`),
scored on held-out BBC text (KL to the dense model, perplexity) and the BBC topic task. `bits-bisect`, whose budget
is a calibration-KL bound rather than bits, gets a table of its own: bounds placed between uniform int4's and
uniform int3's calibration KL, the bits each bound buys and whether the bound holds on held-out text.

Both bundled models' weights come from 4-bit GGUF files (SmolLM2: Q4_1, group 32; Gemma-3-270M: Q4_K_M), so
their "dense" weights already lie on a 4-bit grid; the grid here is group 128 (or `--group-size`) asymmetric, which
is not theirs (SmolLM2's group 32 asymmetric int4 is: avoid that row for conclusions).

The database and the profile are kept under ~/.cache/lensbench/study and reused (a rerun skips them), and so is
each measured row (`study-rows.json` in the database folder): a run stopped part-way resumes at the next row.
Writes one section per model in reports/QUANT.md (as each model finishes) and appends to reports/BENCHMARKS.md.

Usage: python benchmarks/quant_study.py [--models smollm2-135m,gemma3-270m] [--budgets 2.5,3,3.25,3.5,4,4.25]
       [--calib 32] [--heldout 16] [--generations 12] [--workers 2] [--methods uniform,baq,dp] [--group-size 128]
       [--bisect 0.25,0.5,0.75]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, machine, versions  # noqa: E402

import lensbench as lb  # noqa: E402
from lensbench.atomic import write_text  # noqa: E402
from lensbench.capture import batches  # noqa: E402
from lensbench.compress.database import DatabaseConfig, build  # noqa: E402
from lensbench.compress.evaluate import batch_scores  # noqa: E402
from lensbench.compress.zeroshot import bbc_topics, topic_task  # noqa: E402
from lensbench.numeric import wide  # noqa: E402
from lensbench.simquant import block_linears, simulated  # noqa: E402
from lensbench.compress.gptq import GPTQConfig  # noqa: E402
from lensbench.compress.policies import make_plan  # noqa: E402
from lensbench.compress.policies.bits import QuantKL  # noqa: E402
from lensbench.executor import ExecutorConfig  # noqa: E402
from lensbench.profiles import Profile  # noqa: E402
from lensbench.profiling import profile_model  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports"
REPORT = REPORTS / "QUANT.md"
CACHE = Path(os.environ.get("LENSBENCH_STUDY", Path.home() / ".cache" / "lensbench" / "study"))
LEVELS = (2, 3, 4, 8)
RANKINGS = ("lim", "zd", "hessian", "hawq", "augmented", "gptq-kl")
MARKER = "\n## Bit allocation on GPTQ levels\n"
NONE = "''"  # an empty option value, as a shell command line writes it


def two_levels(budget: float) -> tuple[int, int]:
    """(high, low): the levels either side of the budget (an integer budget mixes the levels around it)."""
    lo = max(b for b in LEVELS if b < budget)
    hi = min(b for b in LEVELS if b > budget)
    return hi, lo


def plans_for(model, profile: Profile, budget: float, db: str, texts, generations: int, executor,
              methods: list[str] | None = None, group_size: int = 128) -> dict:
    """{row label: a function making its plan} at `budget`; `methods` keeps the rows whose label starts with one of
    them. Plans are made only when called, so rows a rerun finds in its journal cost nothing."""
    common = {"group_size": group_size, "method": "gptq", "database": db}
    hi, lo = two_levels(budget)
    rank = {"levels": f"{hi},{lo}", **common}
    levels = ",".join(map(str, LEVELS))
    flat = max(b for b in LEVELS if b <= budget + 1e-9)
    make = {f"uniform int{flat}": lambda: make_plan("bits-rank", profile, flat, levels=f"{LEVELS[-1]},{flat}",
                                                    model=model, **common)}
    for r in RANKINGS:
        make[f"rank {r}"] = lambda r=r: make_plan("bits-rank", profile, budget, ranking=r, model=model, **rank)
    make["rank gptq-kl reversed"] = lambda: make_plan("bits-rank", profile, budget, ranking="gptq-kl", reverse=True,
                                                      model=model, **rank)
    for seed in range(3):
        make[f"random {seed}"] = lambda seed=seed: make_plan("bits-rank", profile, budget, ranking="random", seed=seed,
                                                             model=model, **rank)
    make["dp nmse (linear)"] = lambda: make_plan("bits-dp", profile, budget, levels=levels, unit="linear",
                                                 error="nmse", model=model, **common)
    make["dp measured KL (block)"] = lambda: make_plan("bits-dp", profile, budget, levels=levels, error="kl",
                                                       model=model, **common)
    make["evo-bits (block)"] = lambda: make_plan("evo-bits", profile, budget, levels=levels, generations=generations,
                                                 offspring=8, model=model, texts=texts, executor=executor,
                                                 progress=True, **common)
    make["baq (per input group)"] = lambda: make_plan("bits-baq", profile, budget, levels=levels, model=model,
                                                      progress=True, **common)
    if budget >= 3:  # the same without int2, whose GPTQ loss is above the 2^(-2b) model (the database errors show)
        make["baq-no-int2 (levels 3,4,8)"] = lambda: make_plan("bits-baq", profile, budget, levels="3,4,8", model=model,
                                                      progress=True, **common)
    return {label: fn for label, fn in make.items() if not methods or any(label.startswith(m) for m in methods)}


class Journal:
    """The rows measured so far on one database, kept in its folder (`study-rows.json`, written atomically after
    every row), so a run stopped part-way resumes where it stopped: a rerun with the same quality settings takes
    the rows it finds instead of measuring them again."""

    def __init__(self, folder: Path, args):
        from lensbench.jsonio import read as read_json

        self.path = folder / "study-rows.json"
        self.settings = f"heldout {args.heldout}, topics {args.topics}, generations {args.generations}"
        self.rows = read_json(self.path) if self.path.is_file() else {}

    def key(self, *parts) -> str:
        return " | ".join(map(str, parts)) + f" | {self.settings}"

    def get(self, *parts) -> dict | None:
        return self.rows.get(self.key(*parts))

    def put(self, row: dict, *parts) -> dict:
        from lensbench.atomic import write_json

        self.rows[self.key(*parts)] = row
        write_json(self.path, self.rows)
        return row


def bisect_rows(model, profile: Profile, db: str, texts, quality, fractions: list[float], group_size: int,
                journal: Journal) -> list:
    """bits-bisect (levels 4,3, blocks ranked by measured GPTQ KL) at calibration-KL bounds a `fraction` of the way
    from uniform int4's calibration KL to uniform int3's, on the calibration texts the search uses."""
    hi, lo = 4, 3
    rows, ends = [], None
    for f in fractions:
        r = journal.get("bisect", f)
        if r is None:
            if ends is None:
                kl_of = QuantKL(model, texts, group_size, database=db)
                names = block_linears(model)
                ends = {b: kl_of({(i, n): b for i in range(model.n_layers) for n in names}) for b in (hi, lo)}
                del kl_of
            bound = ends[hi] + f * (ends[lo] - ends[hi])
            plan = make_plan("bits-bisect", profile, bound, levels=f"{hi},{lo}", ranking="gptq-kl", model=model,
                             texts=texts, group_size=group_size, method="gptq", database=db)
            p = plan.predicted
            r = journal.put({"fraction": f, "bound": bound, "kl_int4": ends[hi], "kl_int3": ends[lo],
                             "blocks": model.n_layers, "bits": p["average_bits"], "n_low": p["n_low"],
                             "calibration_kl": p["calibration_kl"], "evaluations": plan.meta["search"]["evaluations"],
                             **quality(plan)}, "bisect", f)
        rows.append(r)
        print(f"bisect bound {r['bound']:.4f} ({f:g} of int4 {r['kl_int4']:.4f} -> int3 {r['kl_int3']:.4f}): "
              f"{r['n_low']} blocks at int3, bits {r['bits']:.3f}, calibration KL {r['calibration_kl']:.4f}, held-out "
              f"KL {r['kl']:.4f}, ppl {r['ppl']:.2f}", flush=True)
    return rows


def bisect_table(rows: list) -> list[str]:
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"`bits-bisect` (levels 4,3; blocks least sensitive first by measured GPTQ KL; bisection over the number "
             f"of blocks at int3 of {r0['blocks']}) at calibration-KL bounds between every block at int4 "
             f"(calibration KL {r0['kl_int4']:.4f}) and every block at int3 ({r0['kl_int3']:.4f}), on the 8 "
             f"calibration texts the evolutionary search uses; held-out KL on the held-out articles above.", "",
             "| bound (share of the way to int3) | KL bound | blocks at int3 | average bits | calibration KL | "
             "held-out KL | perplexity | topic accuracy | KL evaluations |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fraction']:g} | {r['bound']:.4f} | {r['n_low']} | {r['bits']:.3f} | "
                     f"{r['calibration_kl']:.4f} | {r['kl']:.4f} | {r['ppl']:.2f} | {r['topic']:.3f} | "
                     f"{r['evaluations']} |")
    return lines


class Quality:
    """Held-out KL to the dense model, perplexity and the topic task of a plan's database weights, simulated in
    place (`simquant`: what the packed weights compute, up to float summation order; the packed kernels are not
    what is measured here). The dense side is computed once."""

    def __init__(self, model, db, heldout: list[str], topics: int):
        self.model, self.weights = model, db.weights(model)
        self.batches = list(batches(model, heldout, 4, 128))
        with torch.no_grad():
            self.dense = [self._logp(b) for b in self.batches]
        scores = [batch_scores(b, logp, logp) for b, logp in zip(self.batches, self.dense, strict=True)]
        self.dense_ppl = math.exp(sum(s["dense_nll"] for s in scores) / sum(s["n_next"] for s in scores))
        self.items = bbc_topics(topics)
        self.dense_topic = topic_task(model, topics, items=self.items)["accuracy"]

    def _logp(self, batch):
        out = self.model.module(**batch.model_inputs(), use_cache=False).logits[batch.content_mask]
        return torch.log_softmax(wide(out), -1)

    @torch.no_grad()
    def __call__(self, plan) -> dict:
        targets = plan.quant_targets(self.model)  # Quant entries: BAQ's carry their per-group widths
        tot = {"kl": 0.0, "nll": 0.0, "dense_nll": 0.0, "n_kl": 0, "n_next": 0}
        with simulated(self.model, targets, self.weights):
            for batch, logp in zip(self.batches, self.dense, strict=True):
                for k, v in batch_scores(batch, logp, self._logp(batch)).items():
                    tot[k] += v
            topic = topic_task(self.model, len(self.items), items=self.items)["accuracy"]
        self.weights.clear()
        return {"kl": tot["kl"] / tot["n_kl"], "ppl": math.exp(tot["nll"] / tot["n_next"]),
                "dense_ppl": math.exp(tot["dense_nll"] / tot["n_next"]), "topic": topic,
                "dense_topic": self.dense_topic}


def db_folder(name: str, args) -> Path:
    """The cached database of these settings (a database refuses to be rebuilt with others in its folder)."""
    return CACHE / (f"{name}-db-c{args.calib}" + (f"-g{args.group_size}" if args.group_size != 128 else "")
                    + ("-clip" if GPTQConfig.clip else ""))


def study(name: str, args, executor) -> tuple[str, list]:
    model = lb.load(name)
    calib = bbc_news("calibration", limit=args.calib)
    folder = db_folder(name, args)
    t0 = time.time()
    cfg = DatabaseConfig(levels=LEVELS, group_size=args.group_size, gptq=GPTQConfig(seq_len=512))
    db = build(model, calib, folder, cfg, executor=executor, progress=True)
    db_s = time.time() - t0
    prof_path = CACHE / f"{name}-profile"
    if (prof_path / "profile.json").is_file():
        profile = Profile.load(prof_path, model=model)
    else:
        profile = profile_model(model, bbc_news("calibration", limit=16), analyses=["redundancy", "weight_outliers"],
                                progress=True, seq_len=128)
        profile.save(prof_path)
    quality = Quality(model, db, bbc_news("heldout", limit=args.heldout), args.topics)
    journal = Journal(folder, args)
    texts = calib[:8]
    rows, reused = [], 0
    for budget in args.budgets:
        t1 = time.time()
        plans = plans_for(model, profile, budget, str(folder), texts, args.generations, executor, args.methods,
                          args.group_size)
        for label, make in plans.items():
            r = journal.get(budget, label)
            earlier = r is not None
            if not earlier:
                plan = make()
                r = journal.put({"budget": budget, "method": label, "bits": plan.predicted["average_bits"],
                                 **quality(plan), "layer_error": plan.predicted.get("layer_error_vs_reference_gptq")},
                                budget, label)
            rows.append(r)
            reused += earlier
            layer = r.get("layer_error")  # BAQ: Σ tr(ΔW H ΔWᵀ) against uniform GPTQ's
            print(f"{name} {budget} {label}: bits {r['bits']:.3f} KL {r['kl']:.4f} ppl {r['ppl']:.2f} topic "
                  f"{r['topic']:.3f}" + (f" layer error {layer:.3f} x uniform GPTQ's" if layer else "")
                  + (" (measured by an earlier run)" if earlier else ""),
                  flush=True)
        print(f"{name} budget {budget}: {time.time() - t1:.0f} s", flush=True)
    if args.bisect:
        bisect = bisect_rows(model, profile, str(folder), texts, quality, args.bisect, args.group_size, journal)
    else:
        bisect = []
    seconds = db.doc.get("seconds", {})
    head = (f"**{name}** (database: {args.calib} BBC calibration articles of up to 512 tokens, levels "
            f"{','.join(map(str, LEVELS))}, group {args.group_size} asymmetric, act-order, searched group ranges; "
            f"built in "
            f"{sum(seconds.values()) / 60:.1f} min of which GPTQ {seconds.get('gptq', 0) / 60:.1f} min"
            f"{' (reused from an earlier run)' if db_s < 60 else ''}; dense held-out perplexity "
            f"{quality.dense_ppl:.2f}, dense topic accuracy {quality.dense_topic:.3f}). " + level_ratios(db)
            + (f" {reused} of the {len(rows)} rows were measured by an earlier run stopped part-way (the study's "
               f"journal), so the minutes above are not theirs." if reused else ""))
    return head, rows, bisect


def level_ratios(db) -> str:
    """How GPTQ's layer error tr(ΔW H ΔWᵀ) grows between the database's levels, against BAQ's model 2^(-2b)."""
    parts = []
    for lo, hi in zip(LEVELS, LEVELS[1:], strict=False):
        ratio = db.table(lo, "error") / np.maximum(db.table(hi, "error"), 1e-30)
        parts.append(f"int{lo}/int{hi} {np.median(ratio):.2f} (model {4 ** (hi - lo):g})")
    return "GPTQ layer error between levels, median over the linears: " + ", ".join(parts) + "."


def table(rows: list) -> list[str]:
    lines = ["| budget | method | average bits | held-out KL | perplexity | topic accuracy |",
             "|---|---|---|---|---|---|"]
    by_budget: dict[float, list] = {}
    for r in rows:
        by_budget.setdefault(r["budget"], []).append(r)
    for budget, rs in by_budget.items():
        randoms = [r for r in rs if r["method"].startswith("random")]
        rest = [r for r in rs if not r["method"].startswith("random")]
        if randoms:
            rest.append({"method": f"random (mean of {len(randoms)})",
                         **{k: statistics.mean(r[k] for r in randoms) for k in ("bits", "kl", "ppl", "topic")}})
        best = min(r["kl"] for r in rest)
        for r in rest:
            mark = "**" if r["kl"] == best else ""
            lines.append(f"| {budget:g} | {r['method']} | {r['bits']:.3f} | {mark}{r['kl']:.4f}{mark} | "
                         f"{r['ppl']:.2f} | {r['topic']:.3f} |")
    return lines


def save_study(name: str, db_folder: Path, command: str, rows: list, group: int, bisect: list) -> Path:
    """The rows as JSON beside a copy of the database's profile, reports/quant-db-<model>/{profile,study.json},
    which the app's quantisation page opens (`lensbench app reports/quant-db-<model>/profile`). A row replaces
    the earlier one of the same budget, method and group size; other runs' rows on the same database are kept.
    A run on another database (other calibration, grid or range setting) starts the file and the profile anew."""
    import shutil

    from lensbench.atomic import write_json
    from lensbench.jsonio import read as read_json

    out = REPORTS / f"quant-db-{name.split('-')[0]}"
    path = out / "study.json"
    doc = read_json(path) if path.is_file() else {}
    if doc.get("database") != db_folder.name:
        doc = {"model": name, "database": db_folder.name, "rows": []}
        shutil.rmtree(out / "profile", ignore_errors=True)
    if not (out / "profile" / "profile.json").is_file():
        shutil.copytree(db_folder / "profile", out / "profile", dirs_exist_ok=True)
    stamp = {"group_size": group, "command": command, "date": time.strftime("%Y-%m-%d")}
    fresh = [{**r, **stamp} for r in rows]
    seen = {(r["budget"], r["method"], r["group_size"]) for r in fresh}
    doc["rows"] = [r for r in doc["rows"] if (r["budget"], r["method"], r["group_size"]) not in seen] + fresh
    if bisect:
        doc["bisect"] = [{**r, **stamp} for r in bisect]
    write_json(path, doc)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--budgets", default="2.5,3,3.25,3.5,4,4.25")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--topics", type=int, default=40)
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2, help="process workers for the database and the search")
    ap.add_argument("--group-size", type=int, default=128, help="the grid's group size (asymmetric)")
    ap.add_argument("--methods", default="", help="only the rows whose label starts with one of these (comma-"
                                                 "separated, e.g. uniform,baq,dp); default every row")
    ap.add_argument("--bisect", default="0.25,0.5,0.75",
                    help="bits-bisect's KL bounds, as shares of the way from uniform int4's calibration KL to "
                         "uniform int3's ('' for none)")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    args.bisect = [float(f) for f in args.bisect.split(",") if f]
    if not all(0 <= f <= 1 for f in args.bisect):
        ap.error(f"--bisect takes shares between 0 and 1, got {args.bisect}")
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    if not args.budgets and not args.bisect:
        ap.error("nothing to run: give --budgets or --bisect")
    torch.set_num_threads(2)
    executor = ExecutorConfig("process", args.workers) if args.workers > 1 else None
    for name in args.models.split(","):  # one report section per model, written as soon as it is done
        load0, t0 = os.getloadavg()[0], time.time()
        head, rows, bisect = study(name, args, executor)
        body = (f"`python benchmarks/quant_study.py --models {name} --budgets "
                f"{','.join(f'{b:g}' for b in args.budgets) or NONE} --calib {args.calib} --heldout {args.heldout} "
                f"--topics {args.topics} --generations {args.generations} --workers {args.workers}"
                f"{f' --group-size {args.group_size}' if args.group_size != 128 else ''}"
                f"{' --methods ' + ','.join(args.methods) if args.methods else ''}"
                f" --bisect {','.join(f'{f:g}' for f in args.bisect) or NONE}` in "
                f"{(time.time() - t0) / 60:.0f} min; {machine()}; {versions('torch', 'transformers')}; load average "
                f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above 2: another job shared the "
                f"cores). Every block linear from one GPTQ database; embedding and head float32. Budgets are average "
                f"code bits over the blocks' linears (scales not counted). `rank X`: the least important blocks by "
                f"ranking X at the level below the budget, the rest at the level above; `uniform`: every block at "
                f"the highest level within the budget; `random`: mean of 3 seeds; `baq`: every linear at the budget "
                f"on average, its input groups of {args.group_size} at widths from GPTQ's column losses (BAQ, "
                f"`bits-baq`), GPTQ from the database's Hessians. Quality: {args.heldout} held-out "
                f"BBC articles of 128 tokens (never the calibration split) and {args.topics} BBC topic "
                f"multiple-choice items, with the database's weights simulated in place (what the packed weights "
                f"compute, up to float summation order). Lowest KL per budget in bold.\n\n"
                + head + "\n\n" + ("\n".join(table(rows)) + "\n" if rows else "")
                + ("\n" + "\n".join(bisect_table(bisect)) + "\n" if bisect else ""))
        print(body)
        command = body.split("`")[1]
        print("wrote", save_study(name, db_folder(name, args), command, rows, args.group_size, bisect))
        append_report(f"Bit allocation on GPTQ levels, {name} (benchmarks/quant_study.py)", body)
        marker = (f"{MARKER.rstrip()}: {name}" + (", searched ranges" if GPTQConfig.clip else "")
                  + (f", group {args.group_size}" if args.group_size != 128 else "")
                  + (f", rows {','.join(args.methods)}" if args.methods else "")
                  + ("" if args.budgets else ", bits-bisect only") + "\n")
        text = REPORT.read_text() if REPORT.exists() else "# Quantisation\n"
        before, _, after = text.partition(marker)
        rest = after.split("\n## ", 1)
        tail = ("\n## " + rest[1]) if len(rest) == 2 else ""
        write_text(REPORT, before.rstrip() + "\n" + marker + "\n" + body + tail)


if __name__ == "__main__":
    main()
