"""Whole-model batch-1 decode of SmolLM2-135M, side by side in one run: lensbench's packed formats, torchao's
weight-only int8/int4 and llama.cpp (llama-cpp-python, if installed: `./run llama`), each as a speed-up over
its own dense baseline and in absolute tokens/s, with a roofline and a run under load.

* Bandwidth: torch copy and triad on the threads the models use (best of 5), measured first.
* Decode: a 128-token prompt (untimed prefill), then `--decode` greedy steps with the KV cache, every
  method once per round in a shuffled order (`--rounds`). lensbench packs every linear, the LM head
  and the embedding (group 128): int8 asym, int8 sym per-row and int4 on the native kernel (integer dot
  products on int16 activations, `gpu/cpu_native.py`, where it builds); int8 sym per-row and int4 on
  torch's bfloat16 weight-only kernels (`gpu/cpu_torch.py`, the native one turned off); int4 exact (numba,
  float32).
  torchao runs on a bfloat16 copy (its CPU kernels need bfloat16), so its baseline is that copy.
  llama.cpp: F32 written by lensbench, then F16, Q8_0, Q4_0 and Q4_K_M made by llama.cpp's own quantiser;
  baseline F32.
* Compiled: `lensbench.decoding.Decoder` (a static KV cache and one torch.compile'd decode step) on copies
  of the model converted for good (`convert`): fp32, int8 g128, int8 sym per-row and int4 g128 (native
  kernel), int8 sym per-row and int4 g128 on torch's kernels, against the compiled fp32 (its linears on
  lensbench's native multi-threaded float32 kernel, `gpu/compiled_dense.py`; "fp32 torch gemv": on torch's,
  as before that kernel); and int4 g128 on
  the plain compiled step (the model's SDPA attention, inductor's Python wrapper), which the Decoder's
  defaults (native attention in the step, the C++ wrapper) are measured against; int4 g128 with transformers'
  eager attention in the step (the default before the native attention); and int4 g128 on a 1024-position
  cache (the Decoder's default length), native and eager attention, where eager attention reads the whole
  cache at every step and the native one only the filled positions. They live in a process of
  their own, as torchao's and llama.cpp's do, away from numba's thread pool. The compile itself (tens of
  seconds each) happens before the rounds and is printed.
* Roofline: bytes read per decoded token (weights as the kernel reads them, plus the KV cache at the mean
  context), achieved GB/s and its fraction of the triad bandwidth; the time outside the linears from
  torch's profiler (every linear wrapped in a `record_function`; for the compiled step, the linears' aten and
  custom ops, read on the plain step only: the C++ wrapper calls its kernels where the profiler does not see
  them).
* Decode KL: teacher-forced one token at a time through the decode kernels, the int4 plan's logits on the
  native kernel (int16 activations) and on torch's (bfloat16) against the exact float32 kernels.
* Prefill at `--prefill` prompt lengths, lensbench packed vs dense, interleaved.
* Crossover: the decode path and the prefill path on all block linears at 1..64 activation rows (int4: the
  native kernel, torch's and the tiles); float32: the native dense kernel and torch's.
* Under load: the lensbench decode rounds again with one CPU-bound process competing for the cores.

Usage: python benchmarks/decode.py [--rounds 5] [--decode 32] [--prefill 128,512,2048] [--load-rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LLAMA_ONE_TOKEN_BATCHES, append_report, competing_process, interleaved, machine, versions  # noqa: E402

import lensbench  # noqa: E402
from lensbench.compress.apply import apply  # noqa: E402
from lensbench.compress.plan import Plan  # noqa: E402
from lensbench.gpu import compiled_dense, cpu_kernels, cpu_native  # noqa: E402
from lensbench.gpu.modules import QuantLinear  # noqa: E402
from lensbench.numeric import storage_bytes  # noqa: E402
from lensbench.profiling import model_card  # noqa: E402
from lensbench.texts import bbc_news  # noqa: E402

warnings.filterwarnings("ignore")
REPORT = Path(__file__).resolve().parent.parent / "reports" / "DECODE.md"
GROUP = 128
LB = {"lensbench int8 g128": (8, GROUP, "asym"), "lensbench int8 sym row": (8, -1, "sym"),
      "lensbench int8 sym row torch kernel": (8, -1, "sym"),
      "lensbench int4 g128": (4, GROUP, "asym"), "lensbench int4 g128 torch kernel": (4, GROUP, "asym"),
      "lensbench int4 g128 exact": (4, GROUP, "asym")}
TORCH_KERNEL = " torch kernel"  # a name ending so runs on torch's kernel, the native one turned off
LLAMA = ("F16", "Q8_0", "Q4_0", "Q4_K_M")
# the compiled decode step (`lensbench.decoding.Decoder`) on models converted for good, against its own compiled fp32
ONE_THREAD = ("lensbench-compiled fp32", "lensbench-compiled int4 g128")  # also timed quiet on one thread
COMPILED = {"lensbench-compiled fp32": None, "lensbench-compiled fp32 torch gemv": None,
            "lensbench-compiled int8 g128": (8, GROUP, "asym"),
            "lensbench-compiled int8 sym row": (8, -1, "sym"), "lensbench-compiled int4 g128": (4, GROUP, "asym"),
            "lensbench-compiled int4 g128 torch kernel": (4, GROUP, "asym"),
            "lensbench-compiled int8 sym row torch kernel": (8, -1, "sym"),
            "lensbench-compiled int4 g128 plain step": (4, GROUP, "asym"),
            "lensbench-compiled int4 g128 eager attention": (4, GROUP, "asym"),
            "lensbench-compiled int4 g128 cache 1024": (4, GROUP, "asym"),
            "lensbench-compiled int4 g128 cache 1024 eager attention": (4, GROUP, "asym")}
PLAIN_STEP = {"step_attention": None, "cpp_wrapper": False, "native_dense": False}  # without the Decoder's defaults
LONG_CACHE = 1024  # the Decoder's default max_length: a cache mostly empty at this benchmark's context


def decoder_options(name: str, ids: torch.Tensor, steps: int) -> dict:
    """The Decoder's arguments for the compiled method `name` (its name's endings say how it differs)."""
    options = {"max_length": LONG_CACHE if f"cache {LONG_CACHE}" in name else ids.shape[1] + steps + 1}
    if name.endswith("plain step"):
        options.update(PLAIN_STEP)
    if name.endswith("eager attention"):
        options["step_attention"] = "eager"
    if name.endswith("torch gemv"):  # float32 linears on torch's kernel (MKL), not the native dense one
        options["native_dense"] = False
    return options
LINEAR_OPS = {"aten::mm", "aten::addmm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm",
              "lensbench::packed_matmul", "lensbench_native::packed_mm", "lensbench_native::dense_mm"}


def bandwidth() -> dict:
    """GB/s of torch copy (2 arrays moved) and triad (3) on 128 MB float32 arrays, best of 5."""
    n = 1 << 25
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = {"copy": 0.0, "triad": 0.0}
    for _ in range(5):
        t0 = time.perf_counter()
        a.copy_(b)
        t1 = time.perf_counter()
        torch.add(b, c, alpha=2.0, out=a)
        t2 = time.perf_counter()
        best["copy"] = max(best["copy"], 2 * 4 * n / (t1 - t0) / 1e9)
        best["triad"] = max(best["triad"], 3 * 4 * n / (t2 - t1) / 1e9)
    return best


def whole_model_plan(model, bits: int, group: int, scheme: str) -> Plan:
    linears = (nn.Linear, nn.Embedding)
    names = {n: (bits, group, scheme) for n, m in model.module.named_modules() if isinstance(m, linears)}
    return Plan.quantize(model_card(model), names, policy={"name": f"int{bits}-{scheme}-g{group}-all"})


@torch.no_grad()
def decode_seconds(module, ids: torch.Tensor, steps: int) -> float:
    out = module(input_ids=ids, use_cache=True)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = module(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


@torch.no_grad()
def prefill_seconds(module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    module(input_ids=ids, use_cache=True)
    return time.perf_counter() - t0


@contextlib.contextmanager
def lensbench_variant(model, plan: Plan | None, exact: bool = False, native: bool = True):
    if plan is None:
        yield model.module
        return
    cpu_kernels.set_exact(exact)
    cpu_native.set_enabled(native)
    try:
        with apply(model, plan):
            yield model.module
    finally:
        cpu_kernels.set_exact(False)
        cpu_native.set_enabled(True)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every linear's weight as its decode kernel reads it (torch's layout where one is used), each
    storage counted once: a fused group's members are row views of one weight."""
    tensors = []
    for m in module.modules():
        if isinstance(m, QuantLinear):
            decision = m.__dict__.get("_compiled")  # a compiled decoder's choice, else what eager decode takes
            native = decision[1][0] == "native" if decision else cpu_native.supported(m.pw)
            lay = None if native else m.pw.__dict__.get("_torch_layout")
            tensors += [t for t in lay if isinstance(t, torch.Tensor)] if lay else [m.pw.packed, m.pw.scales, m.pw.mins]
        elif isinstance(m, nn.Linear):
            tensors.append(m.weight)
    return storage_bytes(tensors)


def kv_bytes(model, context: float) -> float:
    cfg = model.module.config
    kv_dim = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return context * cfg.num_hidden_layers * 2 * kv_dim * 4


@torch.no_grad()
def outside_linears(module, ids: torch.Tensor, steps: int = 8) -> float:
    """Share of decode wall time spent outside the linears, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    handles, open_ = [], {}

    def pre(mod, args):
        open_[id(mod)] = record_function("bench::linear")
        open_[id(mod)].__enter__()

    def post(mod, args, out):
        open_.pop(id(mod)).__exit__(None, None, None)

    for m in module.modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    out = module(input_ids=ids, use_cache=True)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                out = module(input_ids=nxt, cache=cache, use_cache=True)
                cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    lin = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "bench::linear") / 1e6
    return max(0.0, 1 - lin / wall)


def compiled_decoders(ids: torch.Tensor, steps: int) -> dict:
    """{name: Decoder} for COMPILED: each on its own copy of the model (converted in place for good: the
    Decoder's prepared modules must stay), compiled by a first call."""
    from lensbench.compress.apply import convert
    from lensbench.decoding import Decoder

    out = {}
    for name, spec in COMPILED.items():
        model = lensbench.load("smollm2-135m")
        if spec is not None:
            convert(model, whole_model_plan(model, *spec))
        t0 = time.perf_counter()
        cpu_native.set_enabled(not name.endswith(TORCH_KERNEL))  # the kernels are chosen when the Decoder is made
        try:
            out[name] = Decoder(model, **decoder_options(name, ids, steps))
        finally:
            cpu_native.set_enabled(True)
        out[name].generate(ids, 2)
        print(f"{name}: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def one_thread_seconds(dec, ids: torch.Tensor, steps: int) -> float:
    """`compiled_seconds` with every step on one thread (the decoder's own choice restored after)."""
    dec.threads = 1
    try:
        return compiled_seconds(dec, ids, steps)
    finally:
        dec.threads = None


def compiled_seconds(dec, ids: torch.Tensor, steps: int) -> float:
    """Seconds of `steps` compiled decode steps after the prompt (the prompt's own time not counted)."""
    dec.generate(ids, steps + 1)
    return dec.timings["decode_s"]


@torch.no_grad()
def compiled_outside_linears(dec, ids: torch.Tensor, steps: int = 8, repeats: int = 3) -> float:
    """Share of compiled decode time outside the linears' kernels (LINEAR_OPS), from torch's profiler: the
    prompt alone is profiled too and taken off, as the steps cannot be profiled apart from it. The median over
    `repeats` such pairs; a pair whose difference is not a share (the prompt's run took longer, or the linears
    more than the whole: the cores were busy) is dropped, and NaN says no pair was usable."""
    from torch.profiler import ProfilerActivity, profile

    shares = []
    for _ in range(repeats):
        spent = []
        for n in (1, steps + 1):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                dec.generate(ids, n)
                wall = time.perf_counter() - t0
            lin = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in LINEAR_OPS) / 1e6
            spent.append((wall, lin))
        wall, lin = spent[1][0] - spent[0][0], spent[1][1] - spent[0][1]
        if wall > 0 and 0 <= lin <= wall:
            shares.append(1 - lin / wall)
    return statistics.median(shares) if shares else float("nan")


def llama_files(model, work: Path) -> tuple[dict[str, Path], str]:
    """{name: GGUF path}: F32 written by lensbench, then llama.cpp's own quantisations of it; or a note why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {}, "llama-cpp-python is not installed (./run llama builds it): llama.cpp rows left out"
    from compress import llama_quantize  # benchmarks/compress.py

    from lensbench.compress.save import compress

    f32 = compress(model, Plan({}, model_card(model)), format="gguf", out=work / "f32", dtype="float32")
    files = {"llama.cpp F32": f32.path / f32.record["file"]}
    for ftype in LLAMA:
        files[f"llama.cpp {ftype}"] = work / f"{ftype}.gguf"
        llama_quantize(files["llama.cpp F32"], files[f"llama.cpp {ftype}"], ftype)
    return files, ""


def llama_decode_seconds(llm, prompt: list[int], steps: int) -> float:
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return time.perf_counter() - t0


def torchao_models(model) -> tuple[dict, str]:
    """{name: module} for a bfloat16 copy and torchao's int8/int4 weight-only on it; notes on what refused."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        return {}, f"torchao is not installed ({exc})"
    dense = copy.deepcopy(model.module).to(torch.bfloat16)
    out, notes = {"torch bf16": dense}, []
    for name, cfg in (("torchao int8 wo", Int8WeightOnlyConfig()), ("torchao int4 wo", Int4WeightOnlyConfig(GROUP))):
        m = copy.deepcopy(dense)
        try:
            quantize_(m, cfg)
            decode_seconds(m, torch.tensor([[1, 2, 3]]), 1)
            out[name] = m
        except Exception as exc:  # noqa: BLE001 - a refusal is a result to report
            notes.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return out, "; ".join(notes)


class Worker:
    """Another process that holds some of the methods (lensbench's compiled decoders, torchao's models, llama.cpp's)
    and runs one measurement when asked: each family runs alone, as a user would run it, so no library's idle
    threads (ggml's polling pool, numba's OpenMP pool beside torch's) share the cores with another's timed run."""

    def __init__(self, family: str, args, extra: list[str]):
        cmd = [sys.executable, __file__, "--worker", family, "--prompt", str(args.prompt), "--decode",
               str(args.decode), *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.names, self.note = json.loads(self._read())

    def _read(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return line[7:]
        raise RuntimeError(f"the {self.proc.args[3]} worker ended early (exit {self.proc.wait()})")

    def time(self, name: str) -> float:
        return float(self.ask(name))

    def ask(self, line: str):
        """The worker's answer to `line` (a method's name: its seconds), read as JSON."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def worker(family: str, args) -> None:
    """The worker's side: load the family's methods, then time whichever one the driver names."""
    torch.set_num_threads(2)
    model = lensbench.load("smollm2-135m")
    ids = model.tokenize([" ".join(bbc_news("heldout")[:4])], max_length=args.prompt).input_ids
    methods, note, answers = {}, "", {}
    if family == "compiled":
        decs = compiled_decoders(ids, args.decode)
        methods = {k: (lambda d=d: compiled_seconds(d, ids, args.decode)) for k, d in decs.items()}
        context = ids.shape[1] + (args.decode + 1) / 2  # the mean number of cached positions over the steps
        answers["roofline"] = lambda: {k: {  # eager and SDPA attention read the static cache whole at every step
            "bytes_per_token": weight_bytes(d.module)
            + kv_bytes(model, context if d.step_attention == "native" else d.max_length),
            # the C++ wrapper calls the kernels past torch's profiler, so the share is read where it sees them
            "outside_linears": None if d.cpp_wrapper else compiled_outside_linears(d, ids, min(8, args.decode))}
            for k, d in decs.items()}
        for k in ONE_THREAD:  # the same decoders with their steps held on one thread
            answers[f"1 thread: {k}"] = lambda d=decs[k]: one_thread_seconds(d, ids, args.decode)
    elif family == "torchao":
        tao, note = torchao_models(model)
        methods = {k: (lambda m=m: decode_seconds(m, ids, args.decode)) for k, m in tao.items()}
    else:
        from llama_cpp import Llama

        prompt = ids[0].tolist()
        for k, path in json.loads(args.files).items():  # the prompt is untimed: one token per micro-batch costs nothing
            llm = Llama(path, logits_all=True, verbose=False, n_ctx=args.prompt + args.decode + 8,
                        n_threads=2, n_batch=args.prompt, **LLAMA_ONE_TOKEN_BATCHES)
            methods[k] = lambda llm=llm: llama_decode_seconds(llm, prompt, args.decode)
    for f in methods.values():  # warm-up
        f()
    print("RESULT " + json.dumps([list(methods), note]), flush=True)
    for line in sys.stdin:
        name = line.strip()
        print(f"RESULT {json.dumps(answers[name]() if name in answers else methods[name]())}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--prefill", default="128,512,2048")
    ap.add_argument("--prefill-rounds", type=int, default=3)
    ap.add_argument("--load-rounds", type=int, default=3)
    ap.add_argument("--crossover-rounds", type=int, default=5)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--worker", choices=("compiled", "torchao", "llama"), help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args)
    torch.set_num_threads(2)
    t_start = time.time()
    bw = bandwidth()
    print(f"bandwidth: copy {bw['copy']:.1f} GB/s, triad {bw['triad']:.1f} GB/s", flush=True)

    model = lensbench.load("smollm2-135m")
    text = " ".join(bbc_news("heldout")[:4])
    ids = model.tokenize([text], max_length=args.prompt).input_ids
    plans = {k: whole_model_plan(model, *v) for k, v in LB.items()}
    methods = {"lensbench fp32": lambda: decode_seconds(model.module, ids, args.decode)}
    for k, plan in plans.items():
        exact, native = k.endswith("exact"), not k.endswith(TORCH_KERNEL)
        methods[k] = (lambda p=plan, e=exact, n=native:
                      _in(lensbench_variant(model, p, e, n), lambda m: decode_seconds(m, ids, args.decode)))
    notes, workers = [], []
    for f in methods.values():  # warm-up: kernels compiled, layouts made, caches filled
        f()
    compiled = Worker("compiled", args, [])  # kept to the end: the roofline and the run under load use it
    workers.append(compiled)
    if not args.no_torchao:
        workers.append(Worker("torchao", args, []))
    files: dict[str, Path] = {}
    if args.no_llama:
        notes.append("llama.cpp left out (--no-llama)")
    else:
        files, note = llama_files(model, Path(tempfile.mkdtemp(prefix="lensbench-decode-")))
        notes += [note] if note else []
        if files:
            workers.append(Worker("llama", args, ["--files", json.dumps({k: str(p) for k, p in files.items()})]))
    for w in workers:
        notes += [w.note] if w.note else []
        for k in w.names:
            methods[k] = lambda w=w, k=k: w.time(k)
    llama_bytes = {k: p.stat().st_size for k, p in files.items()}
    try:
        times = _interleaved(methods, args.rounds)
    finally:
        for w in workers[1:]:
            w.close()
    rows = _rows(times, args.decode)

    # roofline and profile, lensbench only
    context = args.prompt + args.decode / 2
    roof = {}
    for k in ["lensbench fp32", *plans]:
        with lensbench_variant(model, plans.get(k), k.endswith("exact"), not k.endswith(TORCH_KERNEL)) as m:
            wb = weight_bytes(m)
            share = outside_linears(m, ids)
        per_tok = wb + kv_bytes(model, context)
        tps = rows[k]["tokens_per_s"]
        gbs = per_tok * tps / 1e9
        roof[k] = {"bytes_per_token": per_tok, "gb_s": gbs, "of_triad": gbs / bw["triad"], "outside_linears": share}
    for k, r in compiled.ask("roofline").items():  # the compiled decoders' process
        gbs = r["bytes_per_token"] * rows[k]["tokens_per_s"] / 1e9
        roof[k] = {**r, "gb_s": gbs, "of_triad": gbs / bw["triad"]}
    for k, b in llama_bytes.items():
        per_tok = b + kv_bytes(model, context)  # the whole file: SmolLM2's output matrix is its embedding
        roof[k] = {"bytes_per_token": per_tok, "gb_s": per_tok * rows[k]["tokens_per_s"] / 1e9,
                   "of_triad": per_tok * rows[k]["tokens_per_s"] / 1e9 / bw["triad"], "outside_linears": None}

    dkl = decode_kl(model, plans["lensbench int4 g128"], ids)

    # prefill: lensbench packed vs dense at each prompt length
    prefill, prefill_kl = {}, {}
    long_text = " ".join(bbc_news("heldout")[:64])
    for n in [int(v) for v in args.prefill.split(",")]:
        pids = model.tokenize([long_text], max_length=n).input_ids
        pm = {"lensbench fp32": lambda p=pids: prefill_seconds(model.module, p)}
        for k in PREFILL_KEYS:
            plan, exact = plans[k.removesuffix(" exact")], k.endswith(" exact")
            pm[k] = lambda p=pids, plan=plan, e=exact: _in(lensbench_variant(model, plan, e),
                                                           lambda m: prefill_seconds(m, p))
        for f in pm.values():
            f()
        prefill[int(pids.shape[1])] = _interleaved(pm, args.prefill_rounds)
        prefill_kl[int(pids.shape[1])] = tile_kl(model, plans["lensbench int4 g128"], pids)

    # the decode/prefill crossover: both CPU paths on every block linear, by activation rows
    crossover = crossover_rows(model, args.crossover_rounds)

    # under load: one competing CPU-bound process
    load_keys = ["lensbench fp32", "lensbench int8 g128", "lensbench int4 g128", "lensbench int4 g128 exact",
                 "lensbench-compiled fp32", "lensbench-compiled int4 g128"]
    # quiet, on one thread: a competing process leaves a decode step one core, so this bounds the loaded gains
    one = _interleaved({k: lambda k=k: compiled.time(f"1 thread: {k}") for k in ONE_THREAD}, args.load_rounds)
    try:
        with competing_process():
            loaded = _interleaved({k: methods[k] for k in load_keys}, args.load_rounds)
    finally:
        compiled.close()
    write(args, bw, rows, roof, (prefill, prefill_kl), crossover, (loaded, one), times, notes, time.time() - t_start,
          dkl)


# prefill rows: the default bfloat16 tiles, and int4 with float32 tiles (`set_exact`)
PREFILL_KEYS = ("lensbench int8 g128", "lensbench int4 g128", "lensbench int4 g128 exact")


@torch.no_grad()
def decode_kl(model, plan, ids, tokens: int = 64) -> dict[str, float]:
    """Mean KL per token of the int4 plan's logits through the decode kernels (teacher-forced, one token a step
    with the KV cache), on the native kernel and on torch's, against the exact float32 kernels."""
    ids, logp = ids[:, :tokens], {}
    with lensbench_variant(model, plan) as m:
        for name, exact, native in (("exact", True, True), ("native", False, True), ("torch kernel", False, False)):
            cpu_native.set_enabled(native)
            with cpu_kernels.exact_kernels(exact):
                cache, rows = None, []
                for t in range(ids.shape[1]):
                    out = m(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
                    cache = out.cache
                    rows.append(torch.log_softmax(out.logits[0, -1].double(), -1))
            logp[name] = torch.stack(rows)
        cpu_native.set_enabled(True)
    ref = logp.pop("exact")
    return {k: float((ref.exp() * (ref - v)).sum(-1).mean()) for k, v in logp.items()}


@torch.no_grad()
def tile_kl(model, plan, ids) -> float:
    """Mean KL per token of the int4 plan's prefill logits with bfloat16 tiles against float32 tiles: what the
    default arithmetic adds to the grid's own error."""
    logp = []
    with lensbench_variant(model, plan) as m:  # applied once, run with both tile types
        for exact in (True, False):
            with cpu_kernels.exact_kernels(exact):
                logp.append(torch.log_softmax(m(input_ids=ids).logits[0].double(), -1))
    return float((logp[0].exp() * (logp[0] - logp[1])).sum(-1).mean())


def _in(ctx, fn):
    with ctx as m:
        return fn(m)


def _interleaved(methods: dict, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds of methods that return the seconds of their own timed part (the decode steps, not
    the prefill before them), 50 ms apart so the previous method's spinning threads (OpenMP's, ggml's) idle."""
    return interleaved(methods, rounds, self_timed=True, pause=0.05)


def _rows(times: dict, steps: int) -> dict:
    out = {}
    for k, v in times.items():
        out[k] = {"tokens_per_s": steps / statistics.median(v), "best_tokens_per_s": steps / min(v)}
    return out


BASE = {"lensbench": "lensbench fp32", "lensbench-compiled": "lensbench-compiled fp32", "torch": "torch bf16",
        "torchao": "torch bf16", "llama.cpp": "llama.cpp F32"}


def _paired(times: dict, k: str) -> float:
    base = times[BASE[k.split()[0]]]
    return statistics.median(b / x for b, x in zip(base, times[k], strict=True))


def crossover_rows(model, rounds: int) -> dict:
    """Seconds for all 210 block linears of SmolLM2 at each number of activation rows, on the decode path
    (`cpu_kernels.matmul` below its row threshold: the native kernel, and for comparison torch's int4 kernel and
    numba's int8 gemv) and on the prefill path (dequantised tiles into torch's GEMM), so the threshold is
    read off a measurement."""
    from lensbench.gpu import quant

    weights = [m.weight.detach() for b in model.adapter.blocks for m in b.modules() if isinstance(m, nn.Linear)]
    out = {}
    for bits in (8, 4):
        pws = [quant.quantize(w, bits, GROUP) for w in weights]
        for m in (1, 2, 4, 8, 12, 16, 24, 32, 64):
            xs = {w.shape[1]: torch.randn(m, w.shape[1]) for w in weights}
            other = cpu_kernels.cpu_torch.matmul if bits == 4 else cpu_kernels.gemv
            small = {"decode": cpu_native.matmul if cpu_native.available() else other, "other": other}
            methods = {k: lambda xs=xs, f=f, pws=pws: [f(xs[p.shape[1]], p) for p in pws] for k, f in small.items()}
            methods["prefill"] = lambda xs=xs, pws=pws: [cpu_kernels.tiled(xs[p.shape[1]], p) for p in pws]
            for f in methods.values():
                f()
            out[(bits, m)] = {k: statistics.median(v) for k, v in interleaved(methods, rounds).items()}
    if cpu_native.library_available():  # float32: the compiled step's native dense kernel vs torch's (MKL)
        for m in (1, 2, 4, 8, 12, 16, 24, 32, 64):
            xs = {w.shape[1]: torch.randn(m, w.shape[1]) for w in weights}
            kernels = {"native": torch.ops.lensbench_native.dense_mm, "torch": nn.functional.linear}
            methods = {k: lambda xs=xs, f=f: [f(xs[w.shape[1]], w) for w in weights] for k, f in kernels.items()}
            for f in methods.values():
                f()
            out[(32, m)] = {k: statistics.median(v) for k, v in interleaved(methods, rounds).items()}
    return out


def write(args, bw, rows, roof, prefill, crossover, under_load, times, notes, seconds, dkl) -> None:
    loaded, one = under_load  # {method: seconds per round} under load, and quiet on one thread
    load = subprocess.run(["cat", "/proc/loadavg"], capture_output=True, text=True).stdout.split()[:3]
    lines = [f"SmolLM2-135M, batch 1, {args.prompt}-token prompt, {args.decode} greedy decode steps, "
             f"{args.rounds} interleaved rounds (shuffled order per round), 2 threads. Speed-up = the median over "
             f"rounds of (baseline time / method time) in the same round, against the method's own dense baseline "
             f"(lensbench and llama.cpp: float32; lensbench-compiled, the compiled decode step of "
             f"`lensbench.decoding.Decoder` with a static KV cache: its own compiled float32; torchao: the bfloat16 "
             f"copy its kernels need). "
             f"Machine: {machine()}; load average at the end {' '.join(load)}. Measured bandwidth: copy "
             f"{bw['copy']:.1f} GB/s, triad {bw['triad']:.1f} GB/s. {seconds / 60:.1f} min.", "",
             "| method | tokens/s (median) | tokens/s (best) | x own dense (paired) | bytes/token | GB/s | of triad "
             "| time outside linears |", "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        ro = roof.get(k)
        extra = "- | - | - | -"
        if ro:
            share = ro["outside_linears"]
            share = "-" if share is None else "unmeasured" if math.isnan(share) else f"{share:.0%}"
            extra = f"{ro['bytes_per_token'] / 1e6:.1f} MB | {ro['gb_s']:.1f} | {ro['of_triad']:.0%} | {share}"
        lines.append(f"| {k} | {r['tokens_per_s']:.1f} | {r['best_tokens_per_s']:.1f} | {_paired(times, k):.2f} "
                     f"| {extra} |")
    if notes:
        lines += ["", "Left out: " + "; ".join(notes) + "."]
    lines += ["", f"Decode KL: mean per token over the first 64 prompt tokens fed one at a time with the KV cache, "
              f"int4 g128 logits against the exact float32 kernels: native kernel (int16 activations) "
              f"{dkl['native']:.1e}, torch's kernel (bfloat16 activations) {dkl['torch kernel']:.1e}."]
    prefill, prefill_kl = prefill
    lines += ["", "Prefill (lensbench, whole model packed), tokens/s and speed-up over float32 (paired median). The "
              "packed rows run the default tiles (bfloat16 tiles and activations where the CPU has bfloat16 dot "
              f"products; here: {'yes' if cpu_kernels.BF16_TILES else 'no, float32'}); `int4 exact` float32 tiles "
              "(`set_exact`). KL: mean per token of the int4 prompt's logits with bfloat16 tiles against float32 "
              "tiles (what the arithmetic adds to the grid's error):", "",
              "| prompt tokens | fp32 tokens/s | int8 g128 | x fp32 | int4 g128 | x fp32 | int4 exact | x fp32 | KL |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n, t in prefill.items():
        f = n / statistics.median(t["lensbench fp32"])
        cells = []
        for k in PREFILL_KEYS:
            ratio = statistics.median(b / x for b, x in zip(t["lensbench fp32"], t[k], strict=True))
            cells.append(f"{n / statistics.median(t[k]):.0f} | {ratio:.2f}")
        lines.append(f"| {n} | {f:.0f} | {' | '.join(cells)} | {prefill_kl[n]:.1e} |")
    why = cpu_native.unavailable()
    native = "the native kernel" if why is None else f"the other kernel again (the native one is unavailable: {why})"
    lines += ["", f"Decode path vs prefill path on SmolLM2's 210 block linears by activation rows (ms, median of "
              f"{args.crossover_rounds}; g128: {native}, torch's int4 kernel and numba's int8 gemv, vs tiles); "
              f"lensbench switches to tiles above {cpu_native.MAX_ROWS} rows on the native kernel, "
              f"{cpu_kernels.TORCH_MAX_ROWS} on torch's, {cpu_kernels.GEMV_MAX_ROWS} on numba's:", "",
              "| rows | int4 native | int4 torch kernel | int4 tiles | int8 native | int8 numba gemv | int8 tiles |",
              "|---|---|---|---|---|---|---|"]
    for m in sorted({m for _, m in crossover}):
        c4, c8 = crossover[(4, m)], crossover[(8, m)]
        cells = [f"{c[k] * 1e3:.1f}" for c in (c4, c8) for k in ("decode", "other", "prefill")]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    dense = sorted(m for b, m in crossover if b == 32)
    if dense:
        lines += ["", f"Float32, the same linears (ms, median of {args.crossover_rounds}): lensbench's native dense "
                  f"kernel (`native/dense.cpp`) vs torch's (MKL); a compiled step runs the native one up to "
                  f"{compiled_dense.MAX_ROWS} rows:", "", "| rows | fp32 native | fp32 torch |", "|---|---|---|"]
        lines += [f"| {m} | {crossover[(32, m)]['native'] * 1e3:.1f} | {crossover[(32, m)]['torch'] * 1e3:.1f} |"
                  for m in dense]
    lines += ["", f"Under load (one `while True: pass` process on the 2 cores, {args.load_rounds} rounds): decode "
              "tokens/s and packed/dense ratio, quiet (above) vs loaded:", "",
              "| method | tokens/s loaded | x own fp32 quiet | x own fp32 loaded | loaded / quiet ratio |",
              "|---|---|---|---|---|"]
    for k, v in loaded.items():
        base = loaded[BASE[k.split()[0]]]
        r_load = statistics.median(b / x for b, x in zip(base, v, strict=True))
        r_quiet = _paired(times, k)
        lines.append(f"| {k} | {args.decode / statistics.median(v):.1f} | {r_quiet:.2f} | {r_load:.2f} | "
                     f"{r_load / r_quiet:.2f} |")
    fp32, int4 = (args.decode / statistics.median(one[k]) for k in ONE_THREAD)
    gain = statistics.median(b / x for b, x in zip(*(one[k] for k in ONE_THREAD), strict=True))
    lines += ["", f"Quiet, with the steps held on one thread ({args.load_rounds} rounds, before the competing process "
              f"starts): compiled fp32 {fp32:.1f} tokens/s, compiled int4 g128 {int4:.1f}, int4 {gain:.2f}x fp32 "
              f"({gain / _paired(times, ONE_THREAD[1]):.2f} of its gain on the threads it chooses). With one core "
              f"taken, a step has one core left, so this is about the most the loaded ratio can keep."]
    lines += ["", "Versions: " + versions("lensbench", "torch", "torchao", "transformers", "numba", "llama-cpp-python")]
    body = "\n".join(lines)
    print(body, flush=True)
    REPORT.write_text("# Whole-model decode, side by side (benchmarks/decode.py)\n\nWritten by the newest run; every "
                      "run is also appended to BENCHMARKS.md.\n\n" + body + "\n")
    append_report("Whole-model decode side by side (benchmarks/decode.py)", body)


if __name__ == "__main__":
    main()
