"""`lensbench demo`: the project's main job on the bundled models, end to end.

Profile SmolLM2-135M (redundancy, the block ablation KL and the int4 sensitivity that the plans read) and
MiniLM-L6 (redundancy: an encoder has no next-token KL); print the rankings and how they agree; make a
layer-drop plan and a mixed-precision plan, apply both for real and evaluate them on held-out text against the
dense model; save the layer-drop plan as a GGUF file llama.cpp and transformers load; write the HTML report; say
how to open the app on the results.

The demo is written into a hidden sibling folder and moved into place at the end, so its folder holds one
complete run: a rerun replaces the previous results (an interrupted one leaves them as they were).
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..agreement import rankings
from ..atomic import publish_dir, staging_dir, write_json, write_text
from ..compress.evaluate import EvalConfig, evaluate
from ..compress.policies import make_plan
from ..compress.save import compress
from ..errors import LensbenchError
from ..load import load
from ..profiling import profile_model
from ..summary import evaluation_summary, redundancy_summary, sensitivity_summary
from ..texts import BBC_CALIBRATION, bbc_news, select_texts

MARKER = "demo.json"  # written last; a folder with it holds a finished demo


@dataclass(frozen=True)
class DemoConfig:
    calibration_tokens: int = 1024  # BBC news calibration split, 128-token texts
    drop_blocks: int = 3  # the layer-drop plan: blocks removed, least important by ablation KL first
    average_bits: float = 6.0  # the mixed-precision plan: int8/int4 over the blocks' linears, by int4 sensitivity
    eval_texts: int = 8  # held-out BBC articles
    eval_cities: int = 50
    eval_topics: int = 20
    speed_rounds: int = 3
    decode_tokens: int = 16


@dataclass
class Steps:
    """Times each named step; the table is printed at the end."""
    times: list[tuple[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        yield
        self.times.append((name, time.perf_counter() - t0))

    def table(self) -> str:
        width = max(len(n) for n, _ in self.times)
        rows = [f"  {n:{width}s}  {s:7.1f} s" for n, s in self.times]
        total = sum(s for _, s in self.times)
        return "\n".join(["step times:", *rows, f"  {'total':{width}s}  {total:7.1f} s"])


def _staging(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise LensbenchError(f"--out {out} is a file: give a directory for the demo's results")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise LensbenchError(f"--out {out} holds files that are not a lensbench demo: give an empty or new directory")
    return staging_dir(out)


def _ranking_lines(profile) -> list[str]:
    ranks = sorted(rankings(profile).items())
    width = max(len(name) for name, _ in ranks)
    lines = []
    for name, importance in ranks:
        order = [int(i) for i in (-importance).argsort(kind="stable")]
        lines.append(f"  {name:{width}s}  most important {order[:5]}  least {order[::-1][:5]}")
    return lines


def run_demo(out: str | Path = "lensbench-out/demo", cfg: DemoConfig = DemoConfig()) -> Path:
    """Run the demo into `out`; returns the report's path."""
    out = Path(out)
    staging = _staging(out)
    steps = Steps()
    try:
        with steps("load SmolLM2-135M"):
            lm = load("smollm2-135m")
        with steps("profile SmolLM2-135M: redundancy, block ablation, int4 sensitivity"):
            texts = select_texts(lm, bbc_news("calibration"), 128, cfg.calibration_tokens)
            profile = profile_model(lm, texts, analyses=("redundancy", "ablation", "quant_sensitivity"),
                                    analysis_params={"ablation": {"kinds": ("block",)},
                                                     "quant_sensitivity": {"bits": (4,)}},
                                    seq_len=128, data={"source": BBC_CALIBRATION})
            profile.save(staging / "smollm2-135m")
            profile.to_table(staging / "smollm2-135m" / "layers.csv")
        print(redundancy_summary(profile))
        print(sensitivity_summary(profile))
        print("rankings (layer indices, by importance):")
        print("\n".join(_ranking_lines(profile)))

        plans = {
            "layer-drop": make_plan("drop-block", profile, cfg.drop_blocks, ranking="ablation"),
            "mixed-precision": make_plan("bits-rank", profile, cfg.average_bits, levels="8,4", ranking="quant"),
        }
        evals = {}
        ecfg = EvalConfig(texts=cfg.eval_texts, cities=cfg.eval_cities, topics=cfg.eval_topics,
                          speed_rounds=cfg.speed_rounds, decode_tokens=cfg.decode_tokens)
        for label, plan in plans.items():
            plan.save(staging / "plans" / f"{label}.json")
            with steps(f"evaluate the {label} plan on held-out text (applied for real)"):
                print(repr(plan))
                evals[label] = evaluate(lm, plan, ecfg, progress=True)
            write_json(staging / "plans" / f"{label}.eval.json", evals[label])
            print(f"  {label:16s} {evaluation_summary(evals[label])}")
        with steps("save the layer-drop plan as a GGUF file"):

            saved = compress(lm, plans["layer-drop"], format="gguf", out=staging / "saved" / "smollm2-135m-layer-drop")
            r, file = saved.record, out / "saved" / saved.path.name / saved.record["file"]
            types = ", ".join(f"{n} {t}" for t, n in r["tensor_types"].items())
            print(f"  {len(r['layers_kept'])} of {lm.n_layers} layers, {r['files_bytes'] / 1e6:.1f} MB, "
                  f"{r['bits_per_weight']:.2f} bits per weight ({types})")
            print(f"  loads in llama.cpp (llama-cli -m {file}), transformers (AutoModelForCausalLM.from_pretrained("
                  f"'{file.parent}', gguf_file='{file.name}')) and lensbench.load('{file.parent}')")
        del lm

        with steps("profile MiniLM-L6: redundancy"):
            enc = load("minilm-l6")
            texts = select_texts(enc, bbc_news("calibration"), 128, cfg.calibration_tokens)
            mini = profile_model(enc, texts, seq_len=128, data={"source": BBC_CALIBRATION})
            mini.save(staging / "minilm-l6")
            mini.to_table(staging / "minilm-l6" / "layers.csv")
        print(redundancy_summary(mini))

        with steps("write the HTML report"):
            from ..app.report import report_html  # heavy: plotly, once the results are in

            write_text(staging / "report.html", report_html(profile, evaluations=evals))
        write_json(staging / MARKER, {
            "config": cfg.__dict__, "steps": dict(steps.times),
            "plans": {k: {"file": f"plans/{k}.json", **{m: v for m, v in e.items() if isinstance(v, (int, float))}}
                      for k, e in evals.items()}})
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print("\n" + steps.table())
    print(f"\nreport: {out / 'report.html'}")
    print(f"plans and their evaluations: {out / 'plans'}; the saved GGUF model: {out / 'saved'}")
    print(f"open the app on these results: ./run lensbench app {out / 'smollm2-135m'} {out / 'minilm-l6'}")
    sys.stdout.flush()
    return out / "report.html"
