"""Weight quantisation side by side with what a user would pick instead, in one run, on the same weights: quality
(held-out KL to the dense model, perplexity) and quantisation time for every block linear of a bundled model.

Rows per bit-width and group size:
- lensbench RTN (asymmetric min-max, `--method rtn`) and GPTQ (act-order, on BBC calibration text, `--method gptq`);
- HQQ (`hqq.core.quantize.Quantizer`, half-quadratic optimisation of scale and zero, no calibration data; axis 1,
  the same groups along the input), evaluated with its dequantised weights (what HQQLinear computes with);
- optimum-quanto (`quantize(weights=qintB)` + `freeze` on the block linears, its own modules run): qint4 and qint2
  only, and it chooses its own group (128, or the largest multiple of 32 below that divides the input width);
- torchao int8 / int4 weight-only (`quantize_` on the block linears of a bfloat16 copy, its CPU kernels run): the
  bfloat16 copy's own KL is reported beside it, as torchao's path needs bfloat16 activations.
- llm-compressor's GPTQ (`oneshot` + `GPTQModifier`, static act-order, the same calibration token ids) with
  `--llmc-python`: its release pins another transformers and compressed-tensors than the lock, so it runs from its
  own venv (requirements/llmc-lock.txt) in its own process (`llmc_worker.py`), which scores the same held-out
  batches and reports its dense perplexity as a check that both processes scored the same tokens.

HQQ and optimum-quanto are an optional extra (requirements/peers.in; `./run peers` installs them); a missing
package is a line in the report, not a failure. Calibration: BBC calibration articles; quality: BBC held-out
articles, never the calibration split. Appends to reports/BENCHMARKS.md and writes reports/QUANT.md's peer section.

Usage: python benchmarks/quant_peers.py [--model smollm2-135m] [--configs 4/128,4/64,3/128] [--calib 32] [--heldout 32]
       [--llmc-python .venv-llmc/bin/python]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_report, machine, versions  # noqa: E402
from gptq import plan_for  # noqa: E402

import lensbench as lb  # noqa: E402
from lensbench.capture import batches  # noqa: E402
from lensbench.compress.evaluate import EvalConfig, text_quality  # noqa: E402
from lensbench.compress.gptq import GPTQConfig, prepare  # noqa: E402
from lensbench.load import from_module  # noqa: E402
from lensbench.simquant import block_linears  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

REPORT = Path(__file__).resolve().parent.parent / "reports" / "QUANT.md"
SECTION = "\n## Side by side with HQQ, optimum-quanto and torchao\n"


_ONCE: dict = {}


def once(key, make):
    """A result computed once per run: the rows that do not depend on the group size (torchao's bfloat16 base,
    optimum-quanto, which picks its own groups) are evaluated for the first config and repeated after."""
    if key not in _ONCE:
        _ONCE[key] = make()
    return _ONCE[key]


def lensbench_rows(model, bits, group, calib, heldout, cfg) -> list[tuple]:
    rows = []
    for method in ("rtn", "gptq"):
        plan = plan_for(model, bits, group, "asym", method)
        t0 = time.time()
        if method == "gptq":
            prepare(model, plan.bind(model), calib, GPTQConfig(seq_len=512))
        else:  # the packed weights, made once, as apply would make them
            with lb.apply(model, plan):
                pass
        seconds = time.time() - t0
        rows.append((f"lensbench {method}", text_quality(model, plan, heldout, cfg), seconds, f"g{group} asym"))
    return rows


def hqq_row(model, names, bits, group, heldout, cfg):
    from hqq.core.quantize import Quantizer  # optional: ./run peers

    other = copy.deepcopy(model.module)
    t0 = time.time()
    for name in names:
        lin = other.get_submodule(name)
        w = lin.weight.data
        if w.numel() % group:
            return None, f"HQQ: {name}'s {tuple(w.shape)} is not divisible into groups of {group}"
        wq, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group, optimize=True, axis=1,
                                      bitpack=False, device="cpu")
        meta["compute_dtype"] = torch.float32
        lin.weight.data = Quantizer.dequantize(wq, meta).to(w.dtype)
    seconds = time.time() - t0
    return ("HQQ", text_quality(model, from_module(other, model.tokenizer), heldout, cfg), seconds,
            f"g{group} asym, optimised"), None


def quanto_row(model, bits, heldout, cfg):
    from optimum.quanto import qint2, qint4, qint8  # optional: ./run peers

    qtype = {2: qint2, 4: qint4, 8: qint8}.get(bits)
    if qtype is None:
        return None, f"optimum-quanto has no {bits}-bit weight type (qint2, qint4, qint8)"
    return once(("quanto", bits), lambda: _quanto(model, qtype, bits, heldout, cfg))


def _quanto(model, qtype, bits, heldout, cfg):
    from optimum.quanto import freeze, quantize  # optional: ./run peers

    other = copy.deepcopy(model.module)
    t0 = time.time()
    quantize(other, weights=qtype, include=[f"{model.adapter.block_path(i)}.*" for i in range(model.n_layers)])
    freeze(other)
    seconds = time.time() - t0
    groups = sorted({m.weight_group_size for m in other.modules() if getattr(m, "weight_group_size", None)})
    return (f"optimum-quanto qint{bits}", text_quality(model, from_module(other, model.tokenizer), heldout, cfg),
            seconds, f"its groups {','.join(map(str, groups))}" if groups else "per output row"), None


def torchao_rows(model, names, bits, group, heldout, cfg) -> tuple[list, str | None]:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # optional: in the lock

    config, what = {8: (Int8WeightOnlyConfig(), "per-row symmetric"),
                    4: (Int4WeightOnlyConfig(group), f"g{group}")}.get(bits, (None, None))
    if config is None:
        return [], f"torchao has no {bits}-bit weight-only config"
    bf16 = copy.deepcopy(model.module).to(torch.bfloat16)
    rows = [once("bf16", lambda: ("torch bfloat16 (torchao's base)",
                                  text_quality(model, from_module(bf16, model.tokenizer), heldout, cfg), 0.0,
                                  "no quantisation"))]
    wanted = set(names)
    other = copy.deepcopy(bf16)
    t0 = time.time()
    try:
        quantize_(other, config, filter_fn=lambda module, fqn: fqn in wanted)
    except (ImportError, RuntimeError, NotImplementedError) as exc:  # a refusal on this CPU is a result to report
        return rows, f"torchao int{bits} weight-only refused on CPU: {type(exc).__name__}: {str(exc)[:100]}"
    seconds = time.time() - t0
    rows.append((f"torchao int{bits} weight-only", text_quality(model, from_module(other, model.tokenizer), heldout,
                                                                 cfg), seconds, what))
    return rows, None


def _error_line(stderr: str) -> str:
    """The exception line of a child process's stderr: its last line may be a progress bar."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or ["(no output)"])[-1][:300]


def llmc_rows(model, names, bits, group, calib, heldout, cfg, python: str | None):
    """llm-compressor's GPTQ (`oneshot` + `GPTQModifier`, static act-order like lensbench's) with its default weight
    observer (min-max) and with its MSE one (a range search, as lensbench's default), each in its own venv and
    process (`llmc_worker.py`), on the same weights, calibration token ids and held-out batches."""
    if not python:
        return None, ("llm-compressor GPTQ: not run; it pins another transformers than the lock, so it runs from its "
                      "own venv: `python3.11 -m venv .venv-llmc && .venv-llmc/bin/pip install -r "
                      "requirements/llmc-lock.txt`, then --llmc-python .venv-llmc/bin/python")
    widths = sorted({model.module.get_submodule(n).in_features for n in names} if names else set())
    if any(w % group for w in widths):
        return None, (f"llm-compressor GPTQ at group {group}: its group quantisation needs every input width divisible "
                      f"by the group (input widths {', '.join(map(str, widths))}; with `bypass_divisibility_checks` "
                      f"its quantiser fails)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.module.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
        ids = [b.model_inputs() for b in batches(model, calib, 8, 512)]
        calibration = [row[mask.bool()].tolist() for b in ids for row, mask in zip(b["input_ids"], b["attention_mask"],
                                                                                     strict=True)]
        held = []
        for b in batches(model, heldout, cfg.batch_size, cfg.seq_len):
            inputs = b.model_inputs()
            held.append({"input_ids": inputs["input_ids"].tolist(),
                         "attention_mask": inputs["attention_mask"].tolist(), "content_mask": b.content_mask.tolist(),
                         "next_tokens": b.next_tokens()[b.content_mask].tolist()})
        rows = []
        for observer in (None, "memoryless_mse"):
            job = {"model_dir": str(folder), "calibration": calibration, "heldout": held, "bits": bits,
                   "group_size": group, "symmetric": False, "actorder": "weight", "damp": GPTQConfig.damp,
                   "block": GPTQConfig.block, "seq_len": 512, "threads": torch.get_num_threads(), "observer": observer}
            (Path(tmp) / "job.json").write_text(json.dumps(job))
            worker = str(Path(__file__).with_name("llmc_worker.py"))  # -I: benchmarks/ must not shadow its imports
            run = subprocess.run([python, "-I", worker, str(Path(tmp) / "job.json"), str(Path(tmp) / "result.json")],
                                 capture_output=True, text=True)
            if run.returncode:
                return rows, f"llm-compressor GPTQ failed (exit {run.returncode}): {_error_line(run.stderr)}"
            r = json.loads((Path(tmp) / "result.json").read_text())
            versions_ = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
            rows.append((f"llm-compressor GPTQ, {observer or 'default'} observer ({versions_})", r, r["seconds"],
                         f"g{group} asym, int zero point"))
    return rows, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="a bundled causal model")
    ap.add_argument("--configs", default="4/128,4/64,3/128,8/128", help="bits/group, comma-separated")
    ap.add_argument("--calib", type=int, default=32, help="BBC calibration articles for GPTQ")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON"),
                    help="the python of a venv with llm-compressor (requirements/llmc-lock.txt) for its GPTQ row")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    t_all = time.time()
    model = lb.load(args.model)
    names = list(plan_for(model, 4, 32, "asym", "rtn").quant_targets(model))
    assert len(names) == model.n_layers * len(block_linears(model))
    calib = bbc_news("calibration", limit=args.calib)
    heldout = bbc_news("heldout", limit=args.heldout)
    cfg = EvalConfig(texts=args.heldout, seq_len=128)
    lines = ["| bits | method | grid | KL to dense | perplexity | quantisation s |", "|---|---|---|---|---|---|"]
    notes, dense = [], None
    for item in args.configs.split(","):
        bits, group = map(int, item.split("/"))
        rows = lensbench_rows(model, bits, group, calib, heldout, cfg)
        for label, fn, fn_args in (("HQQ", hqq_row, (model, names, bits, group, heldout, cfg)),
                                   ("optimum-quanto", quanto_row, (model, bits, heldout, cfg)),
                                   ("torchao", torchao_rows, (model, names, bits, group, heldout, cfg)),
                                   ("llm-compressor", llmc_rows,
                                    (model, names, bits, group, calib, heldout, cfg, args.llmc_python))):
            try:
                got, note = fn(*fn_args)
            except ImportError as exc:
                got, note = None, f"{label} is not installed ({exc}): ./run peers"
            rows += got if isinstance(got, list) else [got] if got else []
            if note and note not in notes:
                notes.append(note)
        for label, q, seconds, grid in rows:
            dense = q["dense_perplexity"]
            lines.append(f"| {bits} | {label} | {grid} | {q['kl_to_dense']:.4f} | {q['perplexity']:.2f} | "
                         f"{seconds:.1f} |")
            print(lines[-1], flush=True)
    load_end = os.getloadavg()[0]
    head = (f"`python benchmarks/quant_peers.py --model {args.model} --configs {args.configs} --calib {args.calib} "
            f"--heldout {args.heldout}{' --llmc-python PATH' if args.llmc_python else ''}` in "
            f"{(time.time() - t_all) / 60:.1f} min; {machine()}; "
            f"{versions('torch', 'transformers', 'hqq', 'optimum-quanto', 'torchao')}; load average {load:.1f} at the "
            f"start, {load_end:.1f} at the end (above 2: another job shared the cores, and the seconds are not quiet). "
            f"Every block linear of {args.model} quantised; embedding and head as loaded. Quality: {args.heldout} "
            f"held-out BBC articles of 128 tokens (dense perplexity {dense:.2f}); GPTQ on {args.calib} BBC "
            f"calibration articles of up to 512 tokens. Quantisation seconds: GPTQ includes its calibration passes; "
            f"the others need no data.\n")
    body = head + "\n" + "\n".join(lines) + "\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
    print(body)
    append_report(f"Quantisation side by side with HQQ, optimum-quanto and torchao, {args.model} "
                  f"(benchmarks/quant_peers.py)", body)
    text = REPORT.read_text()
    before, _, after = text.partition(SECTION)
    section, nxt, rest = after.partition("\n## ")
    REPORT.write_text(before.rstrip() + "\n" + SECTION + "\n" + (section.strip() + "\n\n" if section.strip() else "")
                      + body + ("\n" + nxt + rest if nxt else ""))


if __name__ == "__main__":
    main()
