"""`lensbench plan`, `evaluate`, `compress`, `export`: decide, execute, measure and save."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from ..atomic import write_json
from ..compress.database import LEVELS, SCHEMES, DatabaseConfig, build
from ..compress.evaluate import EvalConfig, evaluate
from ..compress.gptq import GPTQConfig
from ..compress.policies.budgets import levels as parse_levels
from ..compress.export import EXPORTERS, export, write
from ..compress.formats import FORMATS
from ..compress.lmeval import check_installed, task_name
from ..compress.plan import METHODS, Plan
from ..compress.policies import POLICIES, make_plan
from ..compress.save import DTYPES, check_out, compress
from ..errors import LensbenchError
from ..load import load
from ..profiles import Profile
from ..profiling import model_source, resolve_seq_len
from ..saved import RECORD, read_record
from ..summary import evaluation_summary
from ..texts import bbc_news, read_text_file, select_texts
from .registry import command, executor_arguments


def saved_plan(path: Path) -> Plan:
    """The plan recorded in a folder that lensbench compress wrote."""
    record = read_record(path)
    if record is None or "plan" not in record:
        raise LensbenchError(f"{path} has no readable {RECORD}: give a folder that lensbench compress wrote")
    return Plan.from_dict(record["plan"], f"{path / RECORD}")


def policy_flags() -> dict[str, dict]:
    """Every policy option as one command-line flag: {field name: {"field", "policies"}}, from the registry."""
    out: dict[str, dict] = {}
    for name, policy in POLICIES.items():
        for field in dataclasses.fields(policy.config):
            out.setdefault(field.name, {"field": field, "policies": {}})["policies"][name] = field
    return out


def _grouped(texts: dict[str, str]) -> str:
    """"drop-block, drop-attn: X; bits-rank: Y" from {policy: text}, policies with the same text together."""
    groups: dict[str, list[str]] = {}
    for name, text in texts.items():
        groups.setdefault(text, []).append(name)
    return "; ".join(f"{', '.join(names)}: {t}" for t, names in groups.items())


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile directory or profile.json")
    p.add_argument("--policy", required=True, help="; ".join(f"{n}: {q.description}" for n, q in POLICIES.items()))
    p.add_argument("--budget", type=float, required=True,
                   help=_grouped({n: q.budget for n, q in POLICIES.items()}))
    p.add_argument("--out", required=True, help="plan JSON file to write")
    p.add_argument("--model", help="model for searches and for bit policies whose profile does not list the "
                   "linears (default: where the profile's model came from)")
    p.add_argument("--texts", help="calibration text file for searches (default: BBC news calibration split)")
    p.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    p.add_argument("--max-tokens", type=int, default=2048, help="calibration tokens for searches")
    executor_arguments(p)
    for name, flag in policy_flags().items():  # the policies' options, from their config dataclasses
        field = flag["field"]
        help_ = (_grouped({n: f.metadata["help"] for n, f in flag["policies"].items()}) + ". Default: "
                 + _grouped({n: str(f.default) for n, f in flag["policies"].items()}))
        kind = {"int": int, "float": float, "str": str}.get(str(field.type))
        if str(field.type) == "bool":
            p.add_argument(f"--{name.replace('_', '-')}", action="store_true", default=None, help=help_)
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=kind, choices=field.metadata.get("choices"),
                           help=help_)


@command("plan", "turn a profile into a plan (what to drop, skip or quantise) under a budget", _plan_arguments,
         out_is_file=True)
def cmd_plan(args) -> int:
    profile = Profile.load(args.profile)
    if args.policy not in POLICIES:
        raise LensbenchError(f"unknown policy {args.policy!r}: use one of {', '.join(POLICIES)}")
    policy = POLICIES[args.policy]
    options = {name: getattr(args, name) for name in policy_flags()}
    cfg = policy.configure(options)  # an option this policy does not take: one line, before the model loads
    policy.check_executor(args.executor_config)
    model = texts = None
    if policy.runs_model(profile, cfg):
        model = load(args.model or model_source(profile.model))
        texts = read_text_file(args.texts, args.encoding) if args.texts else bbc_news("calibration")
        texts = select_texts(model, texts, 128, args.max_tokens)
    plan = make_plan(args.policy, profile, args.budget, model=model, texts=texts, progress=model is not None,
                     executor=args.executor_config, **options)
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


def _quant_db_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name, directory, .gguf file or hub name")
    p.add_argument("--out", required=True, help="the database folder (a rerun with the same settings finishes it)")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="bit-widths to quantise every linear to "
                   f"(default {','.join(map(str, LEVELS))})")
    p.add_argument("--group-size", type=int, default=DatabaseConfig.group_size)
    p.add_argument("--scheme", choices=SCHEMES, default="asym", help="asym (lensbench's packed format), sym "
                   "(what compress --format compressed-tensors stores) or gguf (each level GPTQ onto the GGML type "
                   "its bits map to, for compress --format gguf; no group size)")
    p.add_argument("--texts", help="calibration text file (default: the BBC news calibration split)")
    p.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    p.add_argument("--calib", type=int, default=128, help="calibration texts for the Hessians (default 128)")
    p.add_argument("--seq-len", type=int, default=GPTQConfig.seq_len, help="tokens per calibration text (default "
                   f"{GPTQConfig.seq_len})")
    p.add_argument("--damp", type=float, default=GPTQConfig.damp, help="dampening, a fraction of mean diag(H)")
    p.add_argument("--no-act-order", action="store_true", help="quantise the columns in their own order")
    p.add_argument("--no-clip", action="store_true", help="min-max group ranges (default: each group's range "
                   "searched for the least Hessian-weighted rounding error)")
    p.add_argument("--kl-texts", type=int, default=DatabaseConfig.kl_texts, help="calibration texts (of 128 tokens) "
                   "for the measured KL of each block at each level (0: none)")
    executor_arguments(p)


@command("quant-db", "a GPTQ database: every block linear quantised at every level, stored packed, with "
                     "Hessian sensitivities", _quant_db_arguments)
def cmd_quant_db(args) -> int:
    levels = tuple(parse_levels(args.levels))
    if args.calib < 1 or args.kl_texts < 0 or not args.damp > 0:
        raise LensbenchError("--calib must be 1 or more, --kl-texts 0 or more and --damp above 0")
    cfg = DatabaseConfig(levels, args.group_size, args.scheme,
                         GPTQConfig(damp=args.damp, act_order=not args.no_act_order, clip=not args.no_clip,
                                    seq_len=args.seq_len),
                         kl_texts=args.kl_texts).check()  # before the model loads
    model = load(args.model)
    texts = read_text_file(args.texts, args.encoding) if args.texts else bbc_news("calibration")
    db = build(model, texts[:args.calib], args.out, cfg, executor=args.executor_config, progress=True)
    seconds = db.doc.get("seconds", {})
    print(f"GPTQ database of {model.name}: {db.describe()}; {len(db.where)} linears")
    if seconds:
        print("  " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    damp = max(r[n]["damp"] for rows in db.doc["errors"].values() for r in rows for n in db.linears)
    print(f"  largest dampening used: {damp:g}" + (" (raised: the calibration Hessian was singular; give more "
                                                   "text)" if damp > cfg.gptq.damp else ""))
    print(f"wrote {db.folder} (scores in {db.folder / 'profile'})")
    return 0


ALLOW_SLOW = ("let packed weights that no kernel runs on their device (int2/3/5/6 on CUDA) take the reference path, "
              "which dequantises the whole weight on every call (default: such a plan is refused in one line naming "
              "the layer and the bits that have a kernel)")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the dense model, or with --dense a folder lensbench compress wrote")
    p.add_argument("--plan", help="plan JSON to apply (not with --dense: a saved model carries its plan)")
    p.add_argument("--dense", help="MODEL is a saved checkpoint: measure it against this dense source model")
    p.add_argument("--packed", action="store_true", help="with --dense: load the saved compressed-tensors folder "
                   "(or a GGUF file: its Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights) straight into packed modules (its speed "
                   "and memory are then the packed kernels'), not through transformers, which dequantises it")
    p.add_argument("--out", required=True, help="eval JSON file to write")
    p.add_argument("--texts", help="held-out text file (default: BBC news held-out split)")
    p.add_argument("--encoding", help="the text file's encoding (default: UTF-8)")
    p.add_argument("--n-texts", type=int, default=32, help="held-out BBC articles (default 32)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--cities", type=int, default=200, help="city facts for the zero-shot accuracy")
    p.add_argument("--lm-eval-task", help="also run this local lm-evaluation-harness task YAML on the dense model "
                    "and the plan (needs pip install 'lensbench[lm-eval]')")
    p.add_argument("--lm-eval-limit", type=int, help="at most this many documents of the lm-eval task")
    p.add_argument("--topics", type=int, default=40, help="BBC topic multiple-choice items, scored as "
                    "lm-evaluation-harness's acc_norm (0 skips it)")
    p.add_argument("--method", choices=METHODS, help="round the plan's quantised layers with this method instead of "
                   "the one it records (gptq runs on BBC calibration text first)")
    p.add_argument("--gptq-texts", type=int, help="calibration articles for the plan's GPTQ entries (default 128, "
                   "up to 512 tokens each)")
    p.add_argument("--speed-rounds", type=int, default=7)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--context", type=int, help="score tokens decoded one by one through the KV cache after this many "
                   "prompt tokens of held-out text, and record the cache's bytes (default for a plan with KV entries: "
                   "512)")
    p.add_argument("--allow-slow", action="store_true", help=ALLOW_SLOW)


@command("evaluate", "apply a plan for real and measure quality, speed and memory vs dense", _evaluate_arguments,
         out_is_file=True)
def cmd_evaluate(args) -> int:
    saved = None
    if args.lm_eval_task:  # checked before any model loads
        check_installed()
        task_name(Path(args.lm_eval_task))
    elif args.lm_eval_limit is not None:
        raise LensbenchError("--lm-eval-limit applies to --lm-eval-task: give the task YAML, or drop the limit")
    if args.packed and not args.dense:
        raise LensbenchError("--packed loads a saved compressed-tensors folder or a GGUF file: give it as MODEL "
                             "with its dense source as --dense, or drop --packed")
    if args.dense:  # MODEL is a folder lensbench compress wrote; its plan is in its record
        if args.method:
            raise LensbenchError("--method applies to a plan; a saved model's rounding is already in its weights: "
                                 "drop --method, or evaluate the plan with --plan")
        if args.plan:
            raise LensbenchError("--plan and --dense do not go together: a saved model carries its plan (give the "
                                 "folder lensbench compress wrote, and its dense source with --dense)")
        plan = saved_plan(Path(args.model))
        model = load(args.dense)
        plan.resolve(model)  # the saved model's plan must be of this dense model
        saved = load(args.model, packed=args.packed)
    else:
        if not args.plan:
            raise LensbenchError("give --plan PLAN.json (or, for a saved model, --dense MODEL)")
        plan = Plan.load(args.plan)
        model = load(args.model)  # evaluate checks the plan against it before any work
    if args.method:
        plan = plan.with_method(args.method)
    if args.gptq_texts is not None and not any(q.method == "gptq" for q in plan.quant_actions().values()):
        raise LensbenchError("--gptq-texts applies to a plan with GPTQ entries: drop it, or add --method gptq")
    texts = read_text_file(args.texts, args.encoding) if args.texts else None
    cfg = EvalConfig(texts=args.n_texts, seq_len=resolve_seq_len(model, args.seq_len), cities=args.cities,
                     topics=args.topics, speed_rounds=args.speed_rounds, decode_tokens=args.decode_tokens,
                     gptq_texts=args.gptq_texts or EvalConfig.gptq_texts, context=args.context or 0,
                     allow_slow=args.allow_slow)
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


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name, directory, .gguf file or hub name (a causal LM)")
    p.add_argument("--plan", help="plan JSON to apply first (its quantised layers run on the packed kernels)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate (default 32)")
    p.add_argument("--eager", action="store_true", help="run the decode steps eagerly instead of compiling one")
    p.add_argument("--packed", action="store_true", help="MODEL is a compressed-tensors folder lensbench compress "
                   "wrote or a GGUF file: load it straight into packed modules instead of dequantising it")
    p.add_argument("--allow-slow", action="store_true", help=ALLOW_SLOW)


@command("generate", "greedy text from a model (a plan applied first) with a static KV cache and a compiled "
                     "decode step, and its speed", _generate_arguments)
def cmd_generate(args) -> int:
    from ..compress.apply import apply  # heavy: the packed kernels (numba), for this command only
    from ..decoding import Decoder  # heavy: torch.compile and the custom ops, for this command only

    if args.new_tokens < 1:
        raise LensbenchError(f"--new-tokens must be 1 or more, got {args.new_tokens}")
    if args.packed and args.plan:
        raise LensbenchError("--plan applies to a dense model and --packed loads one already compressed: drop one")
    if args.allow_slow and not args.plan:
        raise LensbenchError("--allow-slow applies to a plan's packed weights: give --plan, or drop --allow-slow")
    plan = Plan.load(args.plan) if args.plan else None
    model = load(args.model, packed=args.packed)
    ids = model.tokenize([args.prompt]).input_ids
    with apply(model, plan, allow_slow=args.allow_slow) if plan is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        dec = Decoder(model, max_length=ids.shape[1] + args.new_tokens, compile=not args.eager)
        if not args.eager:  # else a minute or more of silence, the first time
            print("the first call compiles the decode step for each thread count it tries (inductor's cache serves "
                  "later runs)", file=sys.stderr, flush=True)
        out = dec.generate(ids, args.new_tokens)  # the first call compiles the step
        first = time.perf_counter() - t0
        dec.generate(ids, args.new_tokens)  # a compiled step's speed, from a second call
        t = dec.timings
    print(model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    speed = f"{t['decode_steps'] / t['decode_s']:.1f} tokens/s decode" if t["decode_steps"] else "no decode step"
    print(f"{'plan ' + repr(plan) if plan is not None else 'dense'}, {'eager' if args.eager else 'compiled'}: "
          f"{ids.shape[1]} prompt tokens in {t['prefill_s']:.2f} s, {speed} (second call); first call, compiling "
          f"included, {first:.1f} s", file=sys.stderr)
    return 0


def _compress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the plan's model (bundled name, directory, .gguf file or hub name)")
    p.add_argument("--plan", required=True, help="plan JSON made by lensbench plan")
    p.add_argument("--format", required=True, choices=tuple(FORMATS))
    p.add_argument("--out", required=True, help="folder to write (refused if it holds files, unless --overwrite)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                    help="unquantised weights (default: the model's own dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--method", choices=METHODS, help="round the plan's quantised layers with this method instead of "
                   "the one it records (gptq runs on 128 BBC calibration articles first)")


@command("compress", "save a plan applied to its model as a checkpoint transformers, llama.cpp "
                      "or vLLM load", _compress_arguments)
def cmd_compress(args) -> int:
    check_out(args.out, args.overwrite)
    plan = Plan.load(args.plan)
    if args.method:
        plan = plan.with_method(args.method)
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


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan")
    p.add_argument("--format", required=True, help=", ".join(EXPORTERS))
    p.add_argument("--model", help="the plan's model (default: where its profile's model came from)")
    p.add_argument("--out", help="file to write (default: next to the plan)")


@command("export", "write a mixed-precision plan for torchao, llm-compressor or GPTQModel", _export_arguments,
         out_is_file=True)
def cmd_export(args) -> int:
    if args.format not in EXPORTERS:
        raise LensbenchError(f"unknown export format {args.format!r}: use one of {', '.join(EXPORTERS)}")
    plan = Plan.load(args.plan)
    model = load(args.model or model_source(plan.model))
    doc, suffix = export(plan, model, args.format)
    out = Path(args.out) if args.out else Path(args.plan).with_suffix("").with_suffix(f".{suffix}")
    write(doc, out)
    print(f"wrote {out}" + (f" and {out.with_suffix('.py')}" if args.format == "torchao" else ""))
    return 0
