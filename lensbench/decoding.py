"""Greedy decoding with a static KV cache and one compiled decode step, for dense and packed models (CPU).

At batch 1 a decode step of a small model is hundreds of small operations (norms, rotary embeddings,
attention over the cache, residual adds) around the linears, each paying Python and dispatcher overhead;
`torch.compile` turns the step into a few generated C++ loops plus the linears' kernels. The step needs
shapes that do not change, hence transformers' `StaticCache` (one buffer of `max_length` positions per
layer). Packed modules are prepared first (`gpu.compiled`): each one's kernel is chosen once and traced
into the graph as an aten op or a lensbench custom op, so the graph does not break at the kernels. The step's
float32 linears run on lensbench's native multi-threaded kernel where it builds (`gpu.compiled_dense`: torch's
runs on one thread at decode size).

    dec = Decoder(model)                      # after `lb.convert(model, plan)` or inside `lb.apply`
    ids = dec.generate(prompt_ids, 64)        # [B, T + 64]; the first call compiles (over a minute for SmolLM2)

The prompt runs eagerly (its length varies); only the one-token step is compiled, once per batch size and
thread count. By default the step runs lensbench's native attention where the native kernels are built
(`native_attention`: only the cache positions the mask keeps are read, scores, softmax and values in one pass per
head), else transformers' `eager` attention whatever the model's own (`step_attention`: at one query token
inductor fuses it into its own loops, where SDPA's CPU kernel is one opaque call), and inductor's C++ wrapper
(`cpp_wrapper`: the graph's few hundred kernel calls made from C++, not Python); benchmarks/decode.py measures
them against the plain compiled step. The prompt keeps the model's attention.
The steps also read each rotary embedding's cos and sin from a table made once per Decoder (`RotaryTables`): at
one query token inductor fuses the query's rotary embedding into the attention scores' loop, where it would
compute them again for every cached position.
Each step runs on the thread count that has been fastest lately (`gpu.threads.Adaptive`, as
eager packed decode does: on cores shared with another busy process one thread beats two), so the first
steps on each count compile.
Forward hooks on the model's modules do not run inside a compiled graph, so a model carrying any is refused:
capture with the eager model (`model.module.generate`, `lb.capture`), which this leaves untouched.
Each Decoder compiles its step on its own copy of the forward's code object, and the step checks dynamo's guards
on its inputs only, not on the model's modules (`_input_guards`): a model changed after its Decoder was made is
refused by `generate`, which compares the model's modules and tensors with those it was made for.
"""
from __future__ import annotations

import itertools
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import LensbenchError
from .gpu import compiled, compiled_dense, cpu_native, fusion, threads
from .gpu.modules import PackedModule, QuantEmbedding
from .gpu.threads import Adaptive
from .model import Model

ATTENTION = ("sdpa", "eager")  # the attention implementations a static cache runs with
STEP_ATTENTION = (*ATTENTION, "native")  # what the steps may run ("native": lensbench.native_attention)


class DecodeError(LensbenchError):
    """A model or request the compiled decoder cannot run."""


def _refuse_hooks(module: torch.nn.Module) -> None:
    # the root's own hooks are not called (the step calls its forward directly), so only submodules count
    hooked = next((name for name, m in module.named_modules()
                   if m is not module and (m._forward_hooks or m._forward_pre_hooks)), None)
    if hooked is not None:
        raise DecodeError(f"module {hooked!r} carries forward hooks, which a compiled step would not run: "
                          f"remove them (end the capture) or decode with model.module.generate")


@contextmanager
def attention(module: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Inside the block, the model's attention runs `implementation` (every config object its modules hold)."""
    configs = {id(c): c for m in module.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = implementation
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


class RotaryTables:
    """The cos/sin of every position below `length`, computed once by each rotary-embedding module of `module`,
    for the steps to read instead of computing them. At one query token inductor fuses the query's rotary
    embedding into the attention scores' loop and so computes its cos and sin again for every cached position
    (9 heads x the cache's length x 64 dimensions per layer and step, for SmolLM2); read from a table they
    are two loads. The values are the module's own (its forward, run eagerly on all positions at once). Rotary
    types whose frequencies depend on the sequence's length (dynamic, longrope) keep their own forward, as do
    calls with arguments not tabulated."""

    def __init__(self, module: torch.nn.Module, length: int):
        self.modules = {}
        positions = torch.arange(length)[None]
        for m in module.modules():
            rope = getattr(m, "rope_type", "default")
            kinds = list(rope.values()) if isinstance(rope, dict) else [rope]
            if (not type(m).__name__.endswith("RotaryEmbedding")
                    or not any(n.endswith("inv_freq") for n, _ in m.named_buffers(recurse=False))
                    or any("dynamic" in str(k) or "longrope" in str(k) for k in kinds)):
                continue
            # per layer type where the module has several (Gemma 3: `layer_type`, passed either way)
            calls = ([c for t in rope for c in (((t,), ()), ((), (("layer_type", t),)))] if isinstance(rope, dict)
                     else [((), ())])
            with torch.no_grad():
                self.modules[m] = {key: m(torch.zeros(1, dtype=torch.float32), positions, *key[0], **dict(key[1]))
                                   for key in calls}

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Inside the block, the tabulated modules' forwards read their tables."""
        def forward(tables, original):
            def read(x, position_ids, *args, **kwargs):
                table = tables.get((args, tuple(sorted(kwargs.items()))))
                if table is None:
                    return original(x, position_ids, *args, **kwargs)
                cos, sin = table
                return cos[0][position_ids].to(x.dtype), sin[0][position_ids].to(x.dtype)
            return read
        try:
            for m, tables in self.modules.items():
                m.forward = forward(tables, type(m).forward.__get__(m))
            yield
        finally:
            for m in self.modules:
                m.__dict__.pop("forward", None)


def _own_code(method):
    """`method` (bound) on a copy of its function's code object. dynamo keeps a code object's compiled graphs
    and their guards on that code object, and every model of a class (of every class, where transformers wraps
    forward in one decorator) runs the same one: on its own copy a Decoder's step is looked up among its own
    graphs only, up to dynamo's `recompile_limit` of them (batch sizes x thread counts), and they go with it."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    return types.MethodType(copy, method.__self__)


def _input_guards(entries) -> list[bool]:
    """Which of dynamo's guards a compiled step checks on every call: all but those on the model's modules
    (their attributes, hooks, parameters: thousands of checks on every step; README, "Packed execution on the
    CPU", gives the decode benchmark's runs before and after they were dropped). What they would catch, a model
    changed after its Decoder was made, `Decoder.generate` checks once per call instead (`_layout`), and no
    other model's graphs share the step's code object (`_own_code`). The guards on the step's inputs (batch
    size, the cache's tensors) and on the global state stay."""
    return [not e.orig_guard.source.is_unspecialized_nn_module() for e in entries]


def _layout(module: torch.nn.Module) -> tuple:
    """What a compiled step assumes of the model and does not guard (`_input_guards`): which modules it holds,
    and each parameter's and buffer's identity, dtype, shape, strides and device."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return (tuple(map(id, module.modules())),
            tuple((id(t), t.dtype, t.shape, t.stride(), t.device) for t in tensors))


class Decoder:
    """Greedy generation on `model` with a static KV cache of `max_length` positions; `compile=False` runs the
    same steps eagerly (the reference the compiled step must match). `step_attention` is the attention the steps
    run ("auto": "native" where the native kernels are built, else "eager"; None: the model's own), `cpp_wrapper`
    whether inductor calls the step's kernels from C++, and `separate_build` whether it compiles that wrapper apart from
    the kernels, at -O1 (torch's default builds both in one -O3 compile, whose unrolled wrapper of a 30-layer step took
    minutes: benchmarks/compile_time.py). `threads`
    fixes the steps' thread count (also settable later as `decoder.threads`); None chooses it per step by timing
    (`gpu.threads.Adaptive`). `native_dense`: the step's float32 linears (those not packed) on lensbench's native
    multi-threaded kernel where it is built (`gpu.compiled_dense`), else on torch's."""

    def __init__(self, model: Model, max_length: int = 1024, compile: bool = True,
                 step_attention: str | None = "auto", cpp_wrapper: bool = True, threads: int | None = None,
                 native_dense: bool = True, separate_build: bool = True):
        module = model.module
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise DecodeError(f"threads must be a positive count or None (chosen per step), got {threads!r}")
        self.threads = threads
        if not model.is_causal_lm:
            raise DecodeError(f"{model.name} has no LM head: the decoder generates text from causal LMs only")
        attn = getattr(module.config, "_attn_implementation", None)
        if attn not in ATTENTION:
            raise DecodeError(f"{model.name} runs attention {attn!r}, which the static cache does not hold (a "
                              f"packed KV cache plan?): decode with model.module.generate, or drop the KV plan")
        if step_attention not in (*STEP_ATTENTION, "auto", None):
            raise DecodeError(f"step_attention must be one of {', '.join(STEP_ATTENTION)}, auto or None (the model's "
                              f"own), got {step_attention!r}")
        if step_attention == "auto":
            step_attention = "native" if cpu_native.library_available() else "eager"
        self.step_attention = step_attention or attn  # what the steps run: "native", "eager" or "sdpa"
        if step_attention == "native":
            if not cpu_native.library_available():
                raise DecodeError(f"step_attention='native' needs the native kernels: {cpu_native.unavailable()}; "
                                  f"use step_attention='eager'")
            from . import native_attention  # heavy: transformers (importing it registers the implementation)

            step_attention = native_attention.NAME
        _refuse_hooks(module)
        if next(module.parameters()).device.type != "cpu":
            raise DecodeError("the compiled decoder runs on the CPU; on CUDA use model.module.generate with "
                              "transformers' static cache")
        self.model, self.module, self.max_length = model, module, int(max_length)
        self.cpp_wrapper = bool(cpp_wrapper and compile)
        packed = [m for m in module.modules() if isinstance(m, PackedModule)]
        self._tables = [m for m in packed if isinstance(m, QuantEmbedding)]
        self._linears = [m for m in packed if not isinstance(m, QuantEmbedding)]
        if fusion.unlearnt(self._linears):  # one eager decode-size step: packed linears sharing an input are found
            with torch.no_grad():
                module(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=False)
        self.kernels = compiled.prepare(self._linears, self._tables)
        options = {"guard_filter_fn": _input_guards, "cpp_wrapper": self.cpp_wrapper}
        if self.cpp_wrapper:  # the wrapper at aot_inductor.compile_wrapper_opt_level (-O1), the kernels at -O3
            options["cpp_wrapper_build_separate"] = bool(separate_build)
        self.native_dense = bool(compile and native_dense and cpu_native.library_available())
        if self.native_dense:
            options["post_grad_custom_post_pass"] = compiled_dense.PASS
        self.step = (torch.compile(_own_code(module.forward), dynamic=False, options=options) if compile
                     else module.forward)
        self._layout = _layout(module) if compile else None
        self._attention = step_attention or attn
        self._rotary = RotaryTables(module, self.max_length)
        self._cache = None
        self._threads = Adaptive(torch.get_num_threads())  # as the eager packed path: see gpu.threads
        self.timings: dict = {}  # of the last `generate`: prompt_tokens, prefill_s, decode_steps, decode_s

    def _fresh_cache(self, batch: int):
        from transformers import StaticCache  # heavy: transformers' cache module

        if self._cache is None or self._cache[0] != batch:
            self._cache = (batch, StaticCache(config=self.module.config, max_cache_len=self.max_length))
        else:
            self._cache[1].reset()
        return self._cache[1]

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """The prompt `ids` [B, T] (no padding) followed by `max_new_tokens` greedy tokens: [B, T + new]."""
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise DecodeError(f"ids must be a [batch, tokens] LongTensor, got {tuple(ids.shape)} {ids.dtype}")
        if max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        total = ids.shape[1] + max_new_tokens
        if total > self.max_length:
            raise DecodeError(f"{ids.shape[1]} prompt + {max_new_tokens} new tokens exceed the cache's "
                              f"{self.max_length} positions: make the Decoder with max_length={total} or more")
        if self._layout is not None:
            self._check_unchanged()
        cache = self._fresh_cache(ids.shape[0])
        t0 = time.perf_counter()
        out = self.module.forward(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        tokens = [ids, out.logits[:, -1].argmax(-1, keepdim=True)]
        t1 = time.perf_counter()
        user = torch.get_num_threads()
        try:
            with attention(self.module, self._attention), self._rotary.reading():
                for pos in range(ids.shape[1], total - 1):
                    position = torch.full((ids.shape[0], 1), pos, dtype=torch.long)
                    n = self.threads or self._threads.choose()
                    threads.use(n)
                    t = time.perf_counter()
                    out = self.step(input_ids=tokens[-1], cache=cache, use_cache=True, position_ids=position)
                    tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
                    if not self.threads:
                        self._threads.record(n, time.perf_counter() - t)
        finally:
            threads.use(user)
        self.timings = {"prompt_tokens": ids.shape[1], "prefill_s": t1 - t0, "decode_steps": max_new_tokens - 1,
                        "decode_s": time.perf_counter() - t1}
        return torch.cat(tokens, dim=1)

    def _check_unchanged(self) -> None:
        _refuse_hooks(self.module)
        if _layout(self.module) != self._layout:
            raise DecodeError("the model's modules or weights changed after its Decoder was made (replaced, "
                              "converted, moved or cast), and the compiled step runs them as they were: make a new "
                              "Decoder")

    def close(self) -> None:
        """Forget the kernel choices made for the packed modules (the model's eager path never reads them)."""
        compiled.release(self._linears + self._tables)
        self._cache = None
