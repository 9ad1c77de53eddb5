"""Cost of one DynamicLRP attribution vs a forward+backward pass of the same input, SmolLM2-135M.

Methods, interleaved over rounds (time) and each in a fresh subprocess (peak memory):
- `fwd+bwd`: forward, then backward of the target logit with the parameters requiring grad (the
  ordinary backward: weight gradients included) — the baseline of the goal;
- `fwd+bwd (input grad)`: forward from the input embeddings, backward to them only (what
  Gradient×Input costs; parameters frozen);
- `dynamic-lrp`: `attribute()`, i.e. the forward with the graph plus the relevance walk (AttnLRP rules).
Peak memory is the rise of the process's RSS (sampled every millisecond) during the call, after the
model is loaded and has run one warm-up forward. Goal (issue 7): time ≤ 2× fwd+bwd and peak memory ≤ 2× the backward's.

Usage: python benchmarks/lrp.py [--tokens 32,128] [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, append_report, interleaved, machine, ratio_rows, ratio_table, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench.analyses.lrp.attribute import attribute  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

warnings.filterwarnings("ignore")
METHODS = ("fwd+bwd", "fwd+bwd (input grad)", "dynamic-lrp")


def prompt(model, n_tokens: int) -> str:
    text = " ".join(bbc_news("heldout", limit=4))
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return model.tokenizer.decode(ids)


def make_methods(model, text: str) -> dict:
    batch = model.tokenize([text])
    ids = batch.input_ids
    params = list(model.module.parameters())
    with torch.no_grad():
        target = int(model.module(ids).logits[0, -1].argmax())
    embed = model.module.get_input_embeddings()

    def full():
        for p in params:
            p.requires_grad_(True)
        model.module(ids).logits[0, -1, target].backward()
        for p in params:
            p.grad = None
            p.requires_grad_(False)

    def input_grad():
        emb = embed(ids).detach().requires_grad_(True)
        model.module(inputs_embeds=emb).logits[0, -1, target].backward()

    def lrp():
        attribute(model, text, target=target)

    return dict(zip(METHODS, (full, input_grad, lrp), strict=True))


def memory_child(method: str, n_tokens: int) -> None:
    """Run in a subprocess: print the peak-RSS rise (bytes) of one call after a warm-up."""
    torch.set_num_threads(2)
    model = lensbench.load("smollm2-135m")
    for p in model.module.parameters():
        p.requires_grad_(False)
    methods = make_methods(model, prompt(model, n_tokens))
    with torch.no_grad():  # warm-up without the method's own allocations
        model.module(model.tokenize(["warm up"]).input_ids)
    with PeakRSS(0.001) as peak:
        methods[method]()
    print(json.dumps({"delta": peak.peak_delta}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="32,128")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--memory-child", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    torch.set_num_threads(2)
    model = lensbench.load("smollm2-135m")
    for p in model.module.parameters():
        p.requires_grad_(False)
    lines = [f"Machine: {machine()}. Versions: {versions('torch', 'transformers')}.", ""]
    for n in (int(t) for t in args.tokens.split(",")):
        text = prompt(model, n)
        methods = make_methods(model, text)
        for fn in methods.values():  # warm-up
            fn()
        times = interleaved(methods, args.rounds)
        rel = attribute(model, text)
        c = rel.conservation
        mem = {}
        for m in METHODS:
            out = subprocess.run([sys.executable, __file__, "--memory-child", m, str(n)], capture_output=True,
                                 text=True, check=True)
            mem[m] = json.loads(out.stdout.strip().splitlines()[-1])["delta"]
        lines += [f"### {len(model.tokenize([text]).input_ids[0])} tokens, {args.rounds} interleaved rounds", ""]
        lines += ratio_table(ratio_rows(times, "fwd+bwd"), "fwd+bwd")
        lines += ["", "| method | peak RSS rise MiB | x fwd+bwd |", "|---|---|---|"]
        lines += [f"| {m} | {mem[m] / 2**20:.1f} | {mem[m] / mem['fwd+bwd']:.2f} |" for m in METHODS]
        lines += ["", f"Attribution: {c['nodes']} autograd nodes, coverage {c['coverage']:.2%}, "
                      f"{c['promise_replays']} promise replays, end-to-end conservation error "
                      f"{c['end_to_end_error']:.1e}.", ""]
        print("\n".join(lines[-16:]), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{n} tokens: lrp / fwd+bwd = {med['dynamic-lrp'] / med['fwd+bwd']:.3f}")
    append_report("DynamicLRP cost vs forward+backward (SmolLM2-135M)", "\n".join(lines))


if __name__ == "__main__":
    main()
