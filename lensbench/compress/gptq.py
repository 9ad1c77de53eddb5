"""GPTQ: rounding that compensates each column's error on the columns not yet quantised, from calibration
Hessians (Frantar, Ashkboos, Hoefler & Alistarh, 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv 2210.17323).

For a linear layer with weight W [N, K] and calibration inputs X [n, K], H = 2/n XᵀX. With dampening (a fraction
of the mean diagonal added to it), the upper Cholesky factor U of H⁻¹ gives, column by column in order,
    q_j = round(w_j),   e_j = (w_j - q_j) / U_jj,   w_{j+1:} -= e_j U_{j, j+1:},
which is the optimal brain quantisation update; columns are processed in lazy blocks (the update of the columns
after a block is one matrix product). Group-wise grids are fitted to the already-updated columns of each group
when its first column is reached (`gpu.quant.clipped_grid`: the range with the least H_jj-weighted rounding
error, as the reference implementation's `mse` option searches it; `clip=False` takes min-max, `gpu.quant.grid`);
with `act_order` the columns go in order of decreasing H_jj and the grids are fitted to the original weights
first ("static groups"), so the packed layout is unchanged. With the `gguf` scheme (`gptq_ggml`) the grid is a
GGML type's (`gpu.ggml.fit`: llama.cpp's float16 block scales and sub-block scale codes, fitted to the original
weights) and GPTQ chooses the codes on it, so the GGUF file holds GPTQ's rounding in a type llama.cpp reads as it
is.

`quantize_model` runs the model's blocks in order (sequentially, as the paper does): each block's Hessians come
from inputs produced by the already-quantised earlier blocks, and the model is dense again afterwards.
Memory: the model, one block's Hessians and the calibration activations of one layer.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..capture import batches
from ..errors import LensbenchError
from ..gpu import ggml, threads
from ..gpu.mixed import MixedWeight, check_group_bits, quantize_mixed, split
from ..gpu.quant import (PackedWeight, QuantError, checked, clipped_grid, dequantized, grid, pack, quantize,
                         round_to_grid)
from ..gpu.reference import dequantize
from ..model import Model
from ..offload import is_offloaded, resident
from ..surgery import Surgery
from ..units import is_conv1d
from .apply import cache_key, packed_cache
from .plan import Bound


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # dampening: this fraction of the mean of diag(H) is added to the diagonal
    block: int = 128  # lazy-batch width in columns (a multiple of the group size is used)
    # columns in order of decreasing H_jj, with static groups; on SmolLM2-135M it halved GPTQ's held-out KL at
    # int4 g128 (0.398 -> 0.240, benchmarks/gptq.py), so it is the default
    act_order: bool = True
    # each group's range searched for the least H_jj-weighted rounding error (`gpu.quant.clipped_grid`) instead
    # of min-max; lensbench's own grids only (a GGML type's scales are llama.cpp's quantiser's). On SmolLM2-135M
    # it took int3 g128's held-out perplexity from 134.75 to 69.71 (benchmarks/gptq.py), so it is the default
    clip: bool = True
    batch_size: int = 8
    seq_len: int = 512


@dataclass
class Result:
    """One linear's GPTQ result: the packed weight (a MixedWeight when its groups have different widths), the
    dampening used, the layer error tr(ΔW H ΔWᵀ), the same error of round-to-nearest on the same grid layout (for
    comparison), tr(W H Wᵀ), ||ΔW||² and GPTQ's loss per input column, Σ_rows (w - q)² / [U]_jj² (the OBQ
    error each column's rounding adds; BAQ allocates bits from it)."""

    packed: PackedWeight | MixedWeight
    damp: float
    error: float
    rtn_error: float
    norm: float = 0.0  # tr(W H Wᵀ): `error / norm` is the normalised error (EvoPress's NMSE)
    sq_error: float = 0.0  # ||ΔW||², HAWQ's perturbation term
    column_loss: torch.Tensor | None = None  # [K]


def layer_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) for ΔW = weight - approx [N, K] and H [K, K]: the layer's output error on the calibration
    inputs (up to the factor 2/n in H)."""
    d = (weight.double() - approx.double())
    return float(((d @ hessian.double()) * d).sum())


def _inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(upper Cholesky factor of (H + λI)⁻¹, the relative dampening used): λ starts at `damp` × mean diag(H) and
    grows tenfold while H + λI is not positive definite (too few calibration tokens for a full-rank H)."""
    mean = float(torch.diag(h).mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(8):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
        damp *= 10
    raise QuantError(f"the calibration Hessian stays singular even with dampening {damp:g}: give more "
                     f"calibration text")


class _OwnGrid:
    """GPTQ's rounding onto lensbench's packed grid (`gpu.quant`): group-wise (scale, min), fitted to the original
    weights up front with act-order ("static groups") or else to the updated columns when a group starts."""

    def __init__(self, w: torch.Tensor, bits: int | Sequence[int], gs: int, symmetric: bool, static: bool,
                 importance: torch.Tensor | None = None):
        n, k = w.shape
        self.importance = importance
        self.shape, self.gs, self.symmetric, self.static = (n, k), gs, symmetric, static
        self.groups = [(g0, min(g0 + gs, k)) for g0 in range(0, k, gs)]
        self.uniform = isinstance(bits, int)
        self.bits = bits
        self.width = [bits] * len(self.groups) if self.uniform else [int(b) for b in bits]
        self.scales = torch.zeros(n, len(self.groups), dtype=torch.float16)
        self.mins = torch.zeros(n, len(self.groups), dtype=torch.float16)
        self.codes = torch.zeros(n, k)
        if static:
            for a, b in self.groups:
                self.fit(a, w[:, a:b].float())

    def group_end(self, col: int) -> int | None:
        """Where the group starting at input column `col` ends, when its grid is fitted there."""
        g = col // self.gs
        return None if self.static or col != self.groups[g][0] else self.groups[g][1]

    def fit(self, col: int, span: torch.Tensor) -> None:
        g = col // self.gs
        if self.importance is None:
            self.scales[:, g], self.mins[:, g] = grid(span, self.width[g], self.symmetric)
        else:
            a, b = self.groups[g]
            self.scales[:, g], self.mins[:, g] = clipped_grid(span, self.width[g], self.symmetric,
                                                              self.importance[a:b])

    def round(self, col: int, values: torch.Tensor) -> torch.Tensor:
        g = col // self.gs
        q = round_to_grid(values[:, None], self.scales[:, g], self.mins[:, g], self.width[g], self.symmetric)
        self.codes[:, col] = q[:, 0]
        return dequantized(q, self.scales[:, g], self.mins[:, g])[:, 0]

    def packed(self, padded_k: int) -> PackedWeight | MixedWeight:
        n, k = self.shape
        if self.uniform:
            full = torch.zeros(n, padded_k)
            full[:, :k] = self.codes
            return pack(full, self.scales, self.mins, self.bits, self.gs, (n, k))
        return split(self.codes, self.scales, self.mins, self.width, self.gs, (n, k))


class _GGMLGrid:
    """GPTQ's rounding onto a GGML type's grid (`gpu.ggml.fit`), fitted to the original weights (static: a
    K-quant's super-block scale spans 256 columns), so the stored scales are those llama.cpp's own quantiser
    would choose and only the codes differ."""

    def __init__(self, w: torch.Tensor, qtype: str):
        self.grid = ggml.fit(w.float().numpy(), qtype)
        self.scale, self.low = torch.from_numpy(self.grid.scale), torch.from_numpy(self.grid.low)
        self.codes = torch.zeros(w.shape, dtype=torch.uint8)

    def group_end(self, col: int) -> None:
        return None

    def round(self, col: int, values: torch.Tensor) -> torch.Tensor:
        q = torch.from_numpy(self.grid.column(col, values.numpy()))
        self.codes[:, col] = q
        j = col // self.grid.sub
        return q.float() * self.scale[:, j] + self.low[:, j]

    def packed(self) -> ggml.GGMLWeight:
        return ggml.GGMLWeight(self.grid.qtype, self.grid.pack(self.codes.numpy()), tuple(self.codes.shape))


def _obq(w: torch.Tensor, h: torch.Tensor, rounder, cfg: GPTQConfig, align: int) -> tuple[torch.Tensor, float]:
    """The GPTQ column loop over w [N, K] with Hessian h [K, K] (both float64), rounding each column with
    `rounder`: returns (the OBQ loss of each input column, the relative dampening used). Lazy blocks are a
    multiple of `align` columns."""
    k = w.shape[1]
    order = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(k)
    w, h = w[:, order].float(), h[order][:, order]
    upper, damp = _inverse_factor(h, cfg.damp)  # in float64; the column updates run in float32, as GPTQ's own
    upper = upper.float()
    losses = torch.zeros(k, dtype=torch.float64)
    block = max(align, cfg.block // align * align)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            j = int(order[col])
            end = rounder.group_end(j)  # a group starts (in order only): its grid from the updated columns
            if end is not None:
                span = w1[:, i:i + (end - col)] if end <= i2 else torch.cat([w1[:, i:], w[:, i2:end]], 1)
                rounder.fit(j, span)
            e = (w1[:, i] - rounder.round(j, w1[:, i])) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ upper[i1:i2, i2:]
        losses[i1:i2] = (err.double() ** 2).sum(0)
    return losses[torch.argsort(order)], damp


def _prepared(hessian: torch.Tensor) -> torch.Tensor:
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # inputs never seen: no information, quantise them as they are
    h[dead, dead] = 1
    return h


def _result(weight: torch.Tensor, hessian: torch.Tensor, packed, approx: torch.Tensor, rtn: torch.Tensor,
            damp: float, losses: torch.Tensor) -> Result:
    original = weight.detach().double()
    approx = approx.double()
    return Result(packed, damp, layer_error(original, approx, hessian), layer_error(original, rtn, hessian),
                  layer_error(original, torch.zeros_like(original), hessian),
                  float(((original - approx) ** 2).sum()), losses)


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int | Sequence[int], group_size: int,
                symmetric: bool = False, cfg: GPTQConfig = GPTQConfig()) -> Result:
    """GPTQ of one weight [N, K] with its Hessian [K, K] onto the packed grid (`bits`, `group_size`, scheme);
    `bits` may give one width per input group (BAQ), which gives a MixedWeight."""
    k = weight.shape[1]
    uniform = isinstance(bits, int)
    if not uniform:
        check_group_bits(bits, group_size, k)
    padded, gs = checked(weight, bits if uniform else max(bits), group_size)
    with solve_threads(*weight.shape):
        w = padded[:, :k].double()
        h = _prepared(hessian)
        rounder = _OwnGrid(w, bits, gs, symmetric, static=cfg.act_order,
                           importance=torch.diag(h) if cfg.clip else None)
        losses, damp = _obq(w, h, rounder, cfg, gs)
        packed = rounder.packed(padded.shape[1])
        rtn = dequantize(quantize(weight, bits, gs, symmetric=symmetric) if uniform else
                         quantize_mixed(weight, bits, gs, symmetric))
        return _result(weight, hessian, packed, dequantize(packed), rtn.double(), damp, losses)


@torch.no_grad()
def gptq_ggml(weight: torch.Tensor, hessian: torch.Tensor, qtype: str, cfg: GPTQConfig = GPTQConfig()) -> Result:
    """GPTQ of one weight [N, K] onto GGML type `qtype`'s grid (`gpu.ggml`): a GGMLWeight holding the bytes a GGUF
    file stores; its RTN comparison is `gguf`'s own quantiser (llama.cpp's reference rounding)."""
    if not torch.isfinite(weight).all():
        raise QuantError("the weight holds NaN or Inf values")
    with solve_threads(*weight.shape):
        rounder = _GGMLGrid(weight.detach(), qtype)
        losses, damp = _obq(weight.detach().double(), _prepared(hessian), rounder, cfg, 1)
        packed = rounder.packed()
        rtn = torch.from_numpy(ggml.roundtrip(weight.detach().float().numpy(), qtype))
        return _result(weight, hessian, packed, packed.dequantize(), rtn.double(), damp, losses)


# A solve is thousands of small tensor operations (the column loop, the group grids, the Cholesky), and on 2
# threads each one waits at its end for a preempted thread when another process shares the cores
# (benchmarks/gptq_threads.py). So each solve runs on the count whose recent solves ran fastest per unit of work
# (N*K + K*K for a weight [N, K]: the column loop and the K x K factor, so linears of different shapes compare),
# by the packed decode's policy (`gpu.threads.Adaptive`) with backoff: a count that loses by over 2x is explored
# ever more rarely, as each exploration costs a whole solve. One policy for every solve of the process: the load
# changes more slowly than a linear is solved. The codes do not depend on the count: the column updates are
# elementwise (tests/test_gptq.py checks the codes bitwise on 1 and 2 threads).
_POLICY: list = []


def solve_policy(max_threads: int) -> threads.Adaptive:
    return threads.Adaptive(max_threads, explore=8, backoff=32, first=1)


@contextlib.contextmanager
def solve_threads(n: int, k: int):
    """Run the body (one solve of a weight [n, k]) on the thread count the shared policy picks, and time it."""
    user = torch.get_num_threads()
    if not _POLICY or _POLICY[0].options[-1] != user:
        _POLICY[:] = [solve_policy(user)]
    policy = _POLICY[0]
    count = policy.choose()
    threads.use(count)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        policy.record(count, (time.perf_counter() - t0) / (n * k + k * k))
        threads.use(user)


class _Hessians:
    """H = 2/n Σ x xᵀ of each named linear's inputs at real (not padding) tokens, accumulated by forward hooks;
    `mask` is the current batch's attention mask."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.mask: torch.Tensor | None = None
        self.sums = {name: None for name in modules}
        self.counts = dict.fromkeys(modules, 0)
        self.shared: dict[str, str] = {}  # name -> the first linear that reads the same input (q, k, v)
        self.last: tuple = (None, None, None)  # (input tensor, its name, its product) of the latest call
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            raw = args[0]
            if raw is self.last[0]:  # the same input as the linear before: one product serves both
                self.shared[name] = self.last[1]
                s, n = self.last[2]
            else:
                x = raw.detach()
                x = (x[self.mask] if self.mask is not None and x.shape[:2] == self.mask.shape else
                     x.reshape(-1, x.shape[-1])).float()
                if not torch.isfinite(x).all():
                    raise LensbenchError(f"the calibration inputs of {name} hold NaN or Inf: check the model's "
                                         f"weights and the calibration text")
                s, n = (x.T @ x).double(), x.shape[0]  # one batch in float32, the running sum in float64
                self.last = (raw, name, (s, n))
            self.sums[name] = s if self.sums[name] is None else self.sums[name] + s
            self.counts[name] += n
        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        self.last = (None, None, None)
        return {name: 2 * s / max(self.counts[name], 1) for name, s in self.sums.items()}


def _block_inputs(model: Model, texts, cfg: GPTQConfig) -> tuple[list, list[list[dict]], list[torch.Tensor]]:
    """(the first block's input per calibration batch, the keyword arguments each block receives per batch, the
    batches' attention masks)."""
    blocks = list(model.adapter.blocks)
    first, kwargs, masks = [], [], []
    seen: dict[int, dict] = {}

    def pre(i):
        def hook(module, args, kw):
            if i == 0:
                first.append(args[0] if args else kw["hidden_states"])
            seen[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for batch in batches(model, list(texts), cfg.batch_size, cfg.seq_len):
            seen.clear()
            model.adapter.base(**batch.model_inputs(), use_cache=False)
            kwargs.append([seen[i] for i in range(len(blocks))])
            masks.append(batch.attention_mask.bool())
    finally:
        for h in handles:
            h.remove()
    return first, kwargs, masks


def _output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_hessians(model: Model, names, texts, cfg: GPTQConfig = GPTQConfig()
                   ) -> Iterator[tuple[int, dict[str, nn.Module], dict[str, torch.Tensor], dict[str, str]]]:
    """For each block in order: (its index, its linears among `names` {name: module}, their Hessians, {name: the
    linear whose input it shares}). The block is in memory (`resident`) while the caller holds the item; its
    outputs, computed after the caller returns and with any edits the caller made to its weights, are the next
    block's inputs, so a caller that quantises in place gets the paper's sequential GPTQ and one that does not
    gets every block's Hessian from the dense model."""
    ad, root = model.adapter, model.module
    paths = [ad.block_path(i) for i in range(model.n_layers)]
    xs, kwargs, masks = _block_inputs(model, texts, cfg)
    for i, block in enumerate(ad.blocks):
        with resident(block):  # a layer-by-layer model's block: read in for its pass, its edits dropped after
            mine = {n: root.get_submodule(n) for n in names if n.startswith(paths[i] + ".")}
            h, shared = {}, {}
            if mine:
                hess = _Hessians(mine)
                try:
                    for x, kw, mask in zip(xs, kwargs, masks, strict=True):
                        hess.mask = mask
                        block(x, **kw[i])
                finally:
                    h = hess.close()
                shared = hess.shared
            yield i, mine, h, shared
            xs = [_output(block(x, **kw[i])) for x, kw in zip(xs, kwargs, strict=True)]


def check_targets(model: Model, names) -> None:
    """GPTQ takes the blocks' linear layers only: one line naming the first other module."""
    root, ad = model.module, model.adapter
    paths = [ad.block_path(i) for i in range(model.n_layers)]
    outside = [n for n in names if not any(n.startswith(p + ".") for p in paths)]
    if outside:
        raise LensbenchError(f"GPTQ quantises the blocks' linear layers; {outside[0]} is outside them: quantise it "
                             f"with method rtn")
    for name in names:
        module = root.get_submodule(name)
        if not isinstance(module, nn.Linear) and not is_conv1d(module):
            raise LensbenchError(f"GPTQ quantises linear layers; {name} is a {type(module).__name__}")


def weight_of(module: nn.Module) -> torch.Tensor:
    """The [N, K] weight GPTQ works on (a GPT-2 Conv1D stores it transposed)."""
    return module.weight.T if is_conv1d(module) else module.weight


def solve(name: str, module: nn.Module, hessian: torch.Tensor, bits: int | Sequence[int], group_size: int,
          scheme: str, cfg: GPTQConfig) -> Result:
    """GPTQ of one named linear (onto the GGML type its bits become with the `gguf` scheme); a grid or Hessian
    problem is one line naming it."""
    w = weight_of(module)
    try:
        if scheme == "gguf":
            return gptq_ggml(w, hessian, ggml.ggml_type(bits, w.shape[1]), cfg)
        return gptq_weight(w, hessian, bits, group_size, scheme == "sym", cfg)
    except QuantError as exc:
        raise QuantError(f"{name}: {exc}") from None


@torch.no_grad()
def quantize_model(model: Model, targets: dict, texts, cfg: GPTQConfig = GPTQConfig(),
                   progress: bool = False) -> dict[str, Result]:
    """GPTQ of the named linears ({module name: Quant}) of `model`'s blocks, block by block on `texts`; returns
    {name: Result}. The model's weights are as they were afterwards. A layer-by-layer model (`lensbench.offload`)
    has one block's weights in memory at a time: each block is read in for its pass, quantised in place for the
    next block's inputs, and dropped (with the edits) after it."""
    if not texts:
        raise LensbenchError("GPTQ needs calibration texts")
    check_targets(model, targets)
    surgery, results = Surgery(), {}
    restore = not is_offloaded(model.module)  # a layer-by-layer model's edits go when its block leaves memory
    bar = tqdm(total=model.n_layers, desc="GPTQ", unit="block", disable=not progress, file=sys.stderr, leave=False)
    try:
        for _, mine, h, _ in block_hessians(model, targets, texts, cfg):
            for name, module in mine.items():
                spec = targets[name]
                bits = list(spec.group_bits) if spec.group_bits else spec.bits
                results[name] = solve(name, module, h[name], bits, spec.group_size, spec.scheme, cfg)
                q = dequantize(results[name].packed).to(module.weight.dtype)  # a GGMLWeight dequantises itself
                q = q.T if is_conv1d(module) else q
                if restore:
                    surgery.overwrite(module.weight, q)
                else:
                    module.weight.data.copy_(q)
            bar.update(1)
    finally:
        surgery.restore()
        bar.close()
    return results


def prepare(model: Model, bound: Bound, texts, cfg: GPTQConfig = GPTQConfig(), progress: bool = False) -> dict:
    """Run GPTQ for the plan's `gptq` entries (a plan bound to `model`) on calibration `texts` and leave the
    packed weights where `apply` finds them; returns a summary (layers, dampening, error against RTN)."""
    targets = {n: q for n, q in bound.quant.items() if q.method == "gptq"}
    if not targets:
        return {}
    root = model.module
    cache = packed_cache(model)
    todo = {}
    for name, spec in targets.items():
        module = root.get_submodule(name)
        key = cache_key(name, weight_of(module), spec)
        if key not in cache:
            todo[name] = (spec, key)
    results = quantize_model(model, {n: s for n, (s, _) in todo.items()}, texts, cfg, progress) if todo else {}
    for name, (_, key) in todo.items():
        cache[key] = results[name].packed
    if not results:
        return {"layers": len(targets), "reused": True}
    err = sum(r.error for r in results.values())
    rtn = sum(r.rtn_error for r in results.values())
    return {"layers": len(results), "calibration_texts": len(texts), "seq_len": cfg.seq_len,
            "damp_max": max(r.damp for r in results.values()), "damp": cfg.damp,
            "layer_error_vs_rtn": err / rtn if rtn else 1.0}
