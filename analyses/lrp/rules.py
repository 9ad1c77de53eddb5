"""LRP rules, one per autograd operation type (registered by name; see `registry.py`).

Notation: x, a, b are forward inputs, z the forward output, R the relevance of z, R_x the
relevance given to x, stab(z) = z + ε·sign(z). An operand is *live* when it depends on the input;
constants (weights, buffers, masks, scalars) never receive relevance except where a rule says they
absorb it (a bias's share in a sum).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .promises import saved_inputs
from .registry import Rule, register_rule
from .registry import LRPError
from .registry import RULES


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _dim(d):
    """autograd stores negative dims as unsigned 64-bit numbers; map them back."""
    if isinstance(d, (tuple, list)):
        return type(d)(_dim(x) for x in d)
    return d - (1 << 64) if isinstance(d, int) and d >= (1 << 63) else d


def _f32(t):
    return None if t is None else t.detach().float()


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _full_grads(node, R):
    return [r if r is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
            for r, m in zip(R, node._input_metadata, strict=True)] if len(R) == len(node._input_metadata) else R


def _backward(node, R):
    """The node's own backward applied to R: for a re-indexing operation, exactly the relevance map."""
    grads = _full_grads(node, R)
    grads = [g.to(m.dtype) for g, m in zip(grads, node._input_metadata, strict=True)]
    return [None if g is None else g.float() for g in _as_tuple(node(*grads))]


def _n_inputs(node) -> int:
    return len(node.next_functions)


# ---------------------------------------------------------------------------------------------
# Re-indexing: view, reshape, transpose, permute, expand, slice, select, cat, split, stack, index ...
# R_x = the node's backward applied to R (each output element's relevance goes back to the element
# it was read from; an expand sums the copies). Exactly conservative.
# ---------------------------------------------------------------------------------------------
def _reindex(forward, saved=None, doc="re-indexing: R_x = backward(R), exactly conservative"):
    return Rule(relevance=lambda ctx, node, R: _backward(node, R), forward=forward, saved=saved, doc=doc)


def _of_input(op):
    """A forward replay `op(ctx, node, x, k)` from the node's one input (None while that is unknown)."""
    def forward(ctx, node, k):
        x = ctx.input(node, 0)
        return None if x is None else op(ctx, node, x, k)
    return forward


def _slice(ctx, node, x, k):
    idx = [slice(None)] * x.dim()
    idx[_dim(node._saved_dim) % x.dim()] = slice(_dim(node._saved_start), _dim(node._saved_end), node._saved_step)
    return x[tuple(idx)]


def _fwd_cat(ctx, node, k):
    xs = [ctx.input(node, i) for i in range(_n_inputs(node))]
    return None if any(x is None for x in xs) else torch.cat(xs, _dim(node._saved_dim))


def _fwd_stack(ctx, node, k):
    xs = [ctx.input(node, i) for i in range(_n_inputs(node))]
    return None if any(x is None for x in xs) else torch.stack(xs, _dim(node._saved_dim))


def _fwd_masked_fill(ctx, node, k):
    return None  # the fill value is not saved; consumers fall back


register_rule(("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
               "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4",
               "ViewAsRealBackward0", "FlattenBackward0"),
              _reindex(_of_input(lambda ctx, n, x, k: x.reshape(ctx.out_shape(n)))))
register_rule(("AliasBackward0", "CloneBackward0", "ToCopyBackward0", "LiftFreshBackward0",
               "DetachBackward0", "ContiguousBackward0"),
              _reindex(_of_input(lambda ctx, n, x, k: x.to(n._input_metadata[0].dtype))))
register_rule(("TransposeBackward0", "TransposeBackward1"),
              _reindex(_of_input(lambda ctx, n, x, k: x.transpose(_dim(n._saved_dim0), _dim(n._saved_dim1)))))
register_rule("TBackward0", _reindex(_of_input(lambda ctx, n, x, k: x.t())))
register_rule("PermuteBackward0", _reindex(_of_input(lambda ctx, n, x, k: x.permute(*map(_dim, n._saved_dims)))))
register_rule(("ExpandBackward0", "ExpandBackward1"),
              _reindex(_of_input(lambda ctx, n, x, k: x.expand(ctx.out_shape(n)))))
register_rule(("UnsqueezeBackward0", "UnsqueezeBackward1"),
              _reindex(_of_input(lambda ctx, n, x, k: x.unsqueeze(_dim(n._saved_dim)))))
register_rule("SliceBackward0", _reindex(_of_input(_slice)))
register_rule(("SelectBackward0", "SelectBackward1"),
              _reindex(_of_input(lambda ctx, n, x, k: x.select(_dim(n._saved_dim), _dim(n._saved_index)))))
register_rule("CatBackward0", _reindex(_fwd_cat))
register_rule("StackBackward0", _reindex(_fwd_stack))
register_rule(("SplitBackward0", "SplitBackward1"),
              _reindex(_of_input(lambda ctx, n, x, k: x.split(n._saved_split_size, _dim(n._saved_dim))[k])))
register_rule(("SplitWithSizesBackward0", "SplitWithSizesBackward1"), _reindex(_of_input(
    lambda ctx, n, x, k: x.split(list(n._saved_split_sizes), _dim(n._saved_dim))[k])))
register_rule(("UnbindBackward0", "UnbindBackward1"),
              _reindex(_of_input(lambda ctx, n, x, k: x.unbind(_dim(n._saved_dim))[k])))
register_rule("IndexBackward0", _reindex(_of_input(
    lambda ctx, n, x, k: x[tuple(slice(None) if i is None else i for i in n._saved_indices)])))
register_rule("RepeatBackward0", _reindex(_of_input(lambda ctx, n, x, k: x.repeat(*n._saved_repeats))))
register_rule("GatherBackward0", _reindex(_of_input(lambda ctx, n, x, k: x.gather(_dim(n._saved_dim),
                                                                                    n._saved_index)),
                                          saved_inputs(self=0)))
register_rule("IndexSelectBackward0", _reindex(_of_input(
    lambda ctx, n, x, k: x.index_select(_dim(n._saved_dim), n._saved_index)), saved_inputs(self=0)))
register_rule(("MaxBackward0", "MaxBackward1", "AmaxBackward0", "MinBackward0", "MinBackward1",
               "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0", "MaxPool1DWithIndicesBackward0"),
              _reindex(None, saved_inputs(self=0),
                       doc="max / max-pool: winner takes all, R goes to the selected element (backward(R))"))


def _masked_fill_rel(ctx, node, R):
    kept = _backward(node, R)[0]
    ctx.absorb("masked", R[0].sum() - kept.sum())
    return [kept] + [None] * (_n_inputs(node) - 1)


register_rule(("MaskedFillBackward0", "MaskedFillBackward1"),
              Rule(_masked_fill_rel, _fwd_masked_fill,
                   doc="masked_fill: R_x = R where kept, the filled positions' relevance is absorbed"))


def _where_rel(ctx, node, R):
    return _backward(node, R)


def _fwd_where(ctx, node, k):
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    cond = getattr(node, "_saved_condition", None)
    return None if a is None or b is None or cond is None else torch.where(cond, a, b)


register_rule(("WhereBackward0", "WhereBackward1"),
              Rule(_where_rel, _fwd_where,
                   doc="where(c, a, b): each output element's R goes to the operand it came from"))


# ---------------------------------------------------------------------------------------------
# Elementwise nonlinearities and normalisations: the identity rule, R_x = R (DynamicLRP, LXT's
# identity rule; for normalisation, AttnLRP Prop. 3.4). Weight and bias of a norm get nothing.
# ---------------------------------------------------------------------------------------------
def _identity_rel(ctx, node, R):
    """R_x = R (summed back over broadcast dimensions when x was broadcast)."""
    out = [None] * _n_inputs(node)
    r = R[0]
    child, k = node.next_functions[0]
    if child is not None:
        shape = ctx.out_shape(child, k)  # from the graph's metadata: no value needs rebuilding for a shape
        if shape != tuple(r.shape):
            r = r.sum_to_size(shape)
    out[0] = r
    return out


def _unary(fn, attr="self"):
    def forward(ctx, node, k):
        res = getattr(node, "_saved_result", None)
        if isinstance(res, torch.Tensor):
            return res
        x = ctx.input(node, 0)
        return None if x is None else fn(node, x)
    return Rule(_identity_rel, forward, saved_inputs(**{attr: 0}) if attr else None,
                doc="elementwise nonlinearity: identity rule R_x = R")


_UNARY = {
    "SiluBackward0": lambda n, x: F.silu(x),
    "GeluBackward0": lambda n, x: F.gelu(x, approximate=getattr(n, "_saved_approximate", "none")),
    "ReluBackward0": lambda n, x: F.relu(x),
    "TanhBackward0": lambda n, x: torch.tanh(x),
    "SigmoidBackward0": lambda n, x: torch.sigmoid(x),
    "ExpBackward0": lambda n, x: torch.exp(x),
    "LogBackward0": lambda n, x: torch.log(x),
    "SqrtBackward0": lambda n, x: torch.sqrt(x),
    "RsqrtBackward0": lambda n, x: torch.rsqrt(x),
    "ReciprocalBackward0": lambda n, x: torch.reciprocal(x),
    "NegBackward0": lambda n, x: -x,
    "AbsBackward0": lambda n, x: x.abs(),
    "ErfBackward0": lambda n, x: torch.erf(x),
    "SinBackward0": lambda n, x: torch.sin(x),
    "CosBackward0": lambda n, x: torch.cos(x),
    "PowBackward0": lambda n, x: x.pow(n._saved_exponent),
    "ClampBackward1": lambda n, x: x.clamp(getattr(n, "_saved_min", None), getattr(n, "_saved_max", None)),
    "ClampMinBackward0": lambda n, x: x.clamp_min(n._saved_min),
    "ClampMaxBackward0": lambda n, x: x.clamp_max(n._saved_max),
    "HardtanhBackward0": lambda n, x: F.hardtanh(x, n._saved_min_val, n._saved_max_val),
    "LeakyReluBackward0": lambda n, x: F.leaky_relu(x, n._saved_negative_slope),
    "EluBackward0": lambda n, x: F.elu(x, n._saved_alpha),
    "SoftplusBackward0": lambda n, x: F.softplus(x, n._saved_beta, n._saved_threshold),
    "GeluBackward1": lambda n, x: F.gelu(x),
    "MulBackward1": lambda n, x: x * n._saved_other,
    "DivBackward1": lambda n, x: x / n._saved_other,
    "AddBackward1": lambda n, x: x + n._saved_other * n._saved_alpha if hasattr(n, "_saved_other") else None,
    "LogSoftmaxBackward0": lambda n, x: torch.log_softmax(x, _dim(n._saved_dim)),
}
for _name, _fn in _UNARY.items():
    register_rule(_name, _unary(_fn))
for _name in ("SubBackward1", "RsubBackward1"):  # x - c, c - x: the scalar is not saved
    register_rule(_name, Rule(_identity_rel, None, doc="tensor ± scalar: identity rule R_x = R"))


def _fwd_layer_norm(ctx, node, k):
    if k != 0:
        return None
    x = ctx.input(node, 0)
    w, b = getattr(node, "_saved_weight", None), getattr(node, "_saved_bias", None)
    return None if x is None else F.layer_norm(x, node._saved_normalized_shape, w, b)


register_rule("NativeLayerNormBackward0",
              Rule(_identity_rel, _fwd_layer_norm, saved_inputs(input=0),
                   doc="LayerNorm: identity to the input, nothing to γ and β (AttnLRP Prop. 3.4)"))
register_rule(("NativeBatchNormBackward0", "NativeGroupNormBackward0", "CudnnBatchNormBackward0"),
              Rule(_identity_rel, None, saved_inputs(input=0), doc="batch/group norm: identity rule to the input"))


# ---------------------------------------------------------------------------------------------
# Softmax: identity, or the AttnLRP rule R_x = x ⊙ (R − s·ΣR) (Gradient×Input of softmax); what the
# normaliser keeps, ΣR − ΣR_x, is absorbed as "softmax". Masked entries (s = 0) get nothing. When the
# input cannot be rebuilt (an added mask outside the graph) x = log s, i.e. x up to a per-row shift.
# ---------------------------------------------------------------------------------------------
def attn_softmax(x: torch.Tensor | None, s: torch.Tensor, R: torch.Tensor, dim: int) -> torch.Tensor:
    if x is None:
        x = torch.log(s.clamp_min(1e-30))
    inner = R - s * R.sum(dim, keepdim=True)
    return torch.where(s > 0, torch.nan_to_num(x.float(), neginf=0.0, posinf=0.0) * inner, torch.zeros_like(R))


def _softmax_rel(ctx, node, R):
    if not ctx.cfg.attn_lrp:
        return [R[0]]
    s = _f32(node._saved_result)
    r = attn_softmax(_f32(ctx.input(node, 0)), s, R[0], _dim(node._saved_dim))
    ctx.absorb("softmax", R[0].sum() - r.sum())
    return [r]


register_rule(("SoftmaxBackward0", "SoftmaxBackward1", "SafeSoftmaxBackward0"),
              Rule(_softmax_rel, lambda ctx, node, k: node._saved_result,
                   doc="softmax: AttnLRP x ⊙ (R − s·ΣR) (attn_lrp=True) or identity"))


def _logsumexp_rel(ctx, node, R):
    return [_backward(node, R)[0]]


register_rule("LogsumexpBackward0", Rule(_logsumexp_rel, lambda ctx, node, k: node._saved_result,
                                         saved_inputs(self=0), doc="logsumexp: R_x = softmax(x)·R"))


# ---------------------------------------------------------------------------------------------
# Sums: Add, Sub. The operands share R in proportion to their magnitude, R_a = |a| / (|a|+|b|)·R
# (DynamicLRP's Add rule; exactly conservative). A constant operand (a bias) absorbs its share; an
# operand outside the graph whose value is unknown (None edge) gets nothing. Add needs both operands,
# which autograd never saves: it is the canonical promise-generating operation.
# ---------------------------------------------------------------------------------------------
def _broadcast_split(ctx, node, R, parts):
    """parts: list of (input index or None for an unknown constant, signed contribution)."""
    r = R[0]
    mags = [None if p is None else p.float().abs().expand_as(r) for _, p in parts]
    known = [m for m in mags if m is not None]
    out = [None] * _n_inputs(node)
    if not known:  # nothing rebuildable: split evenly between live operands
        live = [i for i, _ in parts if i is not None and ctx.live(node, i)]
        for i in live:
            out[i] = (r / len(live)).sum_to_size(ctx.out_shape(node.next_functions[i][0],
                                                               node.next_functions[i][1]))
        return out
    den = sum(known)
    even = 1.0 / len(known)
    for (i, p), m in zip(parts, mags, strict=True):
        if m is None:
            continue
        share = torch.where(den > 0, m / den.clamp_min(1e-30), torch.full_like(den, even)) * r
        if i is None or not ctx.live(node, i):
            ctx.absorb("bias", share)
            continue
        out[i] = share.sum_to_size(p.shape)
    return out


def _add_rel(sign: float):
    def rel(ctx, node, R):
        a, b = _f32(ctx.input(node, 0)), _f32(ctx.input(node, 1))
        alpha = float(getattr(node, "_saved_alpha", 1.0) or 1.0)
        ia = 0 if node.next_functions[0][0] is not None else None
        ib = 1 if node.next_functions[1][0] is not None else None
        if (ia is not None and a is None) or (ib is not None and b is None):
            return _even_live(ctx, node, R)
        parts = []
        if a is not None:
            parts.append((ia, a))
        if b is not None:
            parts.append((ib, sign * alpha * b))
        return _broadcast_split(ctx, node, R, parts)
    return rel


def _even_live(ctx, node, R):
    """Fallback when an operand's value cannot be rebuilt: R split evenly over the live operands."""
    live = [i for i in range(_n_inputs(node)) if ctx.live(node, i)]
    out = [None] * _n_inputs(node)
    for i in live:
        child, k = node.next_functions[i]
        out[i] = (R[0] / len(live)).sum_to_size(ctx.out_shape(child, k))
    ctx.unresolved(node)
    return out


def _fwd_add(sign: float):
    def forward(ctx, node, k):
        a, b = ctx.input(node, 0), ctx.input(node, 1)
        if a is None or b is None:
            return None
        alpha = getattr(node, "_saved_alpha", 1.0) or 1.0
        return a + sign * alpha * b
    return forward


register_rule("AddBackward0", Rule(_add_rel(1.0), _fwd_add(1.0), doc="a + b: R_a = |a|/(|a|+|b|)·R (promise)"))
register_rule("SubBackward0", Rule(_add_rel(-1.0), _fwd_add(-1.0), doc="a − b: R_a = |a|/(|a|+|b|)·R (promise)"))


# ---------------------------------------------------------------------------------------------
# Products: Mul, Div. A product with a constant is linear in the live operand: R passes unchanged
# (ε-rule of a diagonal map). Two live operands split R proportionally to |a| and |b| (DynamicLRP;
# for Div, |a| and |1/b|) or uniformly (bilinear="uniform", AttnLRP).
# ---------------------------------------------------------------------------------------------
def _product_rel(div: bool):
    def rel(ctx, node, R):
        r = R[0]
        la, lb = ctx.live(node, 0), ctx.live(node, 1)
        out = [None, None]
        if la and lb:
            if ctx.cfg.bilinear == "uniform":
                wa = torch.full_like(r, 0.5)
            else:
                a, b = _f32(ctx.input(node, 0)), _f32(ctx.input(node, 1))
                if a is None or b is None:
                    return _even_live(ctx, node, R)
                ma, mb = a.abs().expand_as(r), (1.0 / b if div else b).abs().expand_as(r)
                den = ma + mb
                wa = torch.where(den > 0, ma / den.clamp_min(1e-30), torch.full_like(r, 0.5))
            for i, w in ((0, wa), (1, 1 - wa)):
                child, k = node.next_functions[i]
                out[i] = (w * r).sum_to_size(ctx.out_shape(child, k))
        else:
            for i, live in ((0, la), (1, lb)):
                if live:
                    child, k = node.next_functions[i]
                    out[i] = r.sum_to_size(ctx.out_shape(child, k))
        return out
    return rel


def _fwd_mul(ctx, node, k):
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    return None if a is None or b is None else a * b


def _fwd_div(ctx, node, k):
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    return None if a is None or b is None else a / b


register_rule("MulBackward0", Rule(_product_rel(False), _fwd_mul, saved_inputs(self=0, other=1),
                                   doc="a ⊙ b: constant operand → identity; both live → |a|:|b| split"))
register_rule("DivBackward0", Rule(_product_rel(True), _fwd_div, saved_inputs(self=0, other=1),
                                   doc="a / b: constant divisor → identity; both live → |a|:|1/b| split"))


def _pow_tensor_rel(ctx, node, R):
    return [R[0].sum_to_size(ctx.out_shape(*node.next_functions[0]))] + [None] * (_n_inputs(node) - 1)


register_rule("PowBackward1", Rule(_pow_tensor_rel, lambda ctx, node, k: node._saved_result,
                                   saved_inputs(self=0), doc="a ** b (tensor exponent): identity to the base"))


# ---------------------------------------------------------------------------------------------
# Linear maps: the ε-rule R_x = x ⊙ Jᵀ(R / stab(z)), with the γ-rule option (W + γW⁺). For a
# product of two live operands (attention's QKᵀ and A·V) each operand gets half (uniform rule).
# A bias absorbs b ⊙ R / stab(z).
# ---------------------------------------------------------------------------------------------
def _gamma(w: torch.Tensor, gamma: float) -> torch.Tensor:
    return w + gamma * w.clamp_min(0) if gamma > 0 else w


def matmul_eps(ctx, x, w, R, lx: bool, lw: bool, bias=None, alpha: float = 1.0, beta: float = 1.0, z=None):
    """R_x, R_w, bias share for z = beta·bias + alpha·x @ w (batched matmul semantics). `z`: the output if a
    consumer saved it (saves recomputing the product)."""
    if lx and not lw and w.dim() == 2 and x.dim() >= 2:
        # Rows of R that are all zero give zero relevance: compute only the others (the LM head's R is
        # one logit, so 1 row of S is computed instead of S rows of a vocabulary-wide product).
        R2 = R.reshape(-1, R.shape[-1])
        rows = (R2 != 0).any(-1)
        n = int(rows.sum())
        if n < R2.shape[0] // 2:
            x2 = x.reshape(-1, x.shape[-1])
            b2 = None if bias is None else bias.expand(R.shape).reshape(-1, R.shape[-1])[rows]
            z2 = None if z is None else z.reshape(-1, R.shape[-1])[rows]
            rx_rows, _, rb_rows = matmul_eps(ctx, x2[rows], w, R2[rows], True, False, b2, alpha, beta, z2)
            rx = torch.zeros_like(x2)
            rx[rows] = rx_rows
            rb = None
            if rb_rows is not None:
                rb = torch.zeros_like(R2)
                rb[rows] = rb_rows
                rb = rb.reshape(R.shape)
            return rx.reshape(x.shape), None, rb
    both = lx and lw
    if ctx.cfg.gamma > 0 and lx and not lw:
        w = _gamma(w, ctx.cfg.gamma)
        z = None  # the γ-rule's denominator is the modified product
    if z is None:
        z = alpha * torch.matmul(x, w)
        if bias is not None:
            z = z + beta * bias
    s = R / stab(z.float(), ctx.cfg.eps)
    half = 0.5 if both else 1.0
    rx = half * alpha * x * torch.matmul(s, w.transpose(-1, -2)) if lx else None
    rw = half * alpha * w * torch.matmul(x.transpose(-1, -2), s) if lw else None
    rb = beta * bias * s if bias is not None else None
    return rx, rw, rb


_PASS = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "CloneBackward0",
         "ToCopyBackward0", "AliasBackward0", "NativeDropoutBackward0"}


def _from_softmax(node, i: int) -> bool:
    """Does input i come (through re-indexing only) from a softmax? Then it is an attention matrix."""
    child = node.next_functions[i][0]
    while child is not None and type(child).__name__ in _PASS:
        child = child.next_functions[0][0]
    return child is not None and type(child).__name__.startswith(("SoftmaxBackward", "SafeSoftmaxBackward"))


def _mm_rel(ctx, node, R):
    x, w = _f32(ctx.input(node, 0)), _f32(ctx.input(node, 1))
    lx, lw = ctx.live(node, 0), ctx.live(node, 1)
    if ctx.cfg.cp_lrp and lx and lw and _from_softmax(node, 0):  # CP-LRP on eager attention: A is a constant
        lx = False
    if x is None or w is None:
        raise_unresolved(node)
    rx, rw, _ = matmul_eps(ctx, x, w, R[0], lx, lw, z=ctx.values.known.get((node, 0)))
    if rw is not None and rw.shape != w.shape:
        rw = rw.sum_to_size(w.shape)
    return [rx, rw]


def _addmm_rel(ctx, node, R):
    b, x, w = _f32(ctx.input(node, 0)), _f32(ctx.input(node, 1)), _f32(ctx.input(node, 2))
    alpha = float(getattr(node, "_saved_alpha", 1.0))
    beta = float(getattr(node, "_saved_beta", 1.0))
    if x is None or w is None:
        raise_unresolved(node)
    lb, lx, lw = ctx.live(node, 0), ctx.live(node, 1), ctx.live(node, 2)
    if b is None:  # a bias outside the graph: recover it from the output if a consumer saved that
        z = ctx.values.known.get((node, 0))
        if z is not None:
            b = (_f32(z) - alpha * torch.matmul(x, w)) / (beta or 1.0)
    if b is None:  # ... otherwise its share cannot be computed, and it takes none
        ctx.unresolved(node)
        rx, rw, rb = matmul_eps(ctx, x, w, R[0], lx, lw, None, alpha)
    else:
        rx, rw, rb = matmul_eps(ctx, x, w, R[0], lx, lw, b.expand(R[0].shape), alpha, beta,
                                ctx.values.known.get((node, 0)))
        if rb is not None:
            if lb:
                rb = rb.sum_to_size(b.shape)
            else:
                ctx.absorb("bias", rb)
                rb = None
    return [rb, rx, rw]


def raise_unresolved(node):

    raise LRPError(f"{type(node).__name__}: an operand could not be rebuilt from the graph (it was neither saved nor "
                   f"replayable); register a forward for the operation that produced it")


def _fwd_mm(ctx, node, k):
    x, w = ctx.input(node, 0), ctx.input(node, 1)
    return None if x is None or w is None else torch.matmul(x, w)


def _fwd_addmm(ctx, node, k):
    b, x, w = ctx.input(node, 0), ctx.input(node, 1), ctx.input(node, 2)
    if x is None or w is None or b is None:
        return None
    return getattr(node, "_saved_beta", 1.0) * b + getattr(node, "_saved_alpha", 1.0) * (x @ w)


register_rule(("MmBackward0", "BmmBackward0", "MvBackward0", "DotBackward0", "MatmulBackward0"),
              Rule(_mm_rel, _fwd_mm, saved_inputs(self=0, mat2=1, vec=1, tensor=1, other=1),
                   doc="x @ W: ε-rule R_x = x ⊙ ((R/stab(z)) Wᵀ); two live operands: halves"))
register_rule(("AddmmBackward0", "BaddbmmBackward0"),
              Rule(_addmm_rel, _fwd_addmm, saved_inputs(mat1=1, mat2=2, batch1=1, batch2=2),
                   doc="b + x @ W: ε-rule, the bias absorbs b ⊙ R/stab(z)"))


def _linear_rel(ctx, node, R):
    x, w = _f32(ctx.input(node, 0)), _f32(ctx.input(node, 1))
    b = _f32(ctx.input(node, 2)) if _n_inputs(node) > 2 else None
    if x is None or w is None:
        raise_unresolved(node)
    rx, rw, rb = matmul_eps(ctx, x, w.t(), R[0], ctx.live(node, 0), ctx.live(node, 1),
                            None if b is None else b.expand(R[0].shape))
    if rb is not None:
        ctx.absorb("bias", rb)
    return [rx, None if rw is None else rw.t().sum_to_size(w.shape)] + [None] * (_n_inputs(node) - 2)


register_rule("LinearBackward0",
              Rule(_linear_rel, lambda ctx, n, k: F.linear(ctx.input(n, 0), ctx.input(n, 1),
                                                          ctx.input(n, 2) if _n_inputs(n) > 2 else None),
                   saved_inputs(self=0, weight=1), doc="F.linear: ε-rule, the bias absorbs its share"))


def _conv_rel(ctx, node, R):
    x, w = _f32(ctx.input(node, 0)), _f32(ctx.input(node, 1))
    b = _f32(ctx.input(node, 2)) if _n_inputs(node) > 2 and node.next_functions[2][0] is not None else None
    if x is None or w is None:
        raise_unresolved(node)
    lx, lw = ctx.live(node, 0), ctx.live(node, 1)
    if ctx.cfg.gamma > 0 and lx and not lw:
        w = _gamma(w, ctx.cfg.gamma)
    z = _conv(node, x, w, b)
    s = R[0] / stab(z, ctx.cfg.eps)
    grads = _as_tuple(node(s.to(node._input_metadata[0].dtype)))
    half = 0.5 if lx and lw else 1.0
    out = [half * x * grads[0].float() if lx else None, half * w * grads[1].float() if lw else None]
    if _n_inputs(node) > 2:
        if b is not None and grads[2] is not None:
            ctx.absorb("bias", b * grads[2].float())
        out.append(None)
    return out


def _conv(node, x, w, b):
    return torch.convolution(x, w, b, node._saved_stride, node._saved_padding, node._saved_dilation,
                             node._saved_transposed, node._saved_output_padding, node._saved_groups)


register_rule("ConvolutionBackward0",
              Rule(_conv_rel, lambda ctx, n, k: _conv(n, ctx.input(n, 0), ctx.input(n, 1),
                                                      ctx.input(n, 2) if _n_inputs(n) > 2 else None),
                   saved_inputs(input=0, weight=1), doc="convolution: ε-rule through the node's own backward"))


register_rule(("AdaptiveAvgPool2DBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool1DBackward0"),
              _reindex(None, doc="average pooling: R spread evenly over each window (backward(R)); conservative"))


# ---------------------------------------------------------------------------------------------
# Reductions: Sum, Mean. ε-rule R_i = x_i / stab(Σx)·R (the 1/n of a mean cancels).
# ---------------------------------------------------------------------------------------------
def _reduce_rel(ctx, node, R):
    x = _f32(ctx.input(node, 0))
    if x is None:  # input not rebuildable: spread R evenly over the reduced elements
        x = torch.ones(ctx.out_shape(*node.next_functions[0]))
    dims = _dim(getattr(node, "_saved_dim", None))
    keep = bool(getattr(node, "_saved_keepdim", False))
    if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
        z = x.sum()
        r = R[0].reshape(())
        return [x * (r / stab(z, ctx.cfg.eps))]
    dims = tuple(d % x.dim() for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
    z = x.sum(dims, keepdim=True)
    r = R[0] if keep else _unsqueeze_all(R[0], dims)
    return [x * (r / stab(z, ctx.cfg.eps))]


def _unsqueeze_all(t, dims):
    for d in sorted(dims):
        t = t.unsqueeze(d)
    return t


def _fwd_sum(mean: bool):
    def forward(ctx, node, k):
        x = ctx.input(node, 0)
        if x is None:
            return None
        dims = _dim(getattr(node, "_saved_dim", None))
        keep = bool(getattr(node, "_saved_keepdim", False))
        if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
            return x.mean() if mean else x.sum()
        return x.mean(dims, keepdim=keep) if mean else x.sum(dims, keepdim=keep)
    return forward


register_rule(("SumBackward0", "SumBackward1"), Rule(_reduce_rel, _fwd_sum(False),
                                                     doc="sum: R_i = x_i / stab(Σx) · R"))
register_rule(("MeanBackward0", "MeanBackward1"), Rule(_reduce_rel, _fwd_sum(True),
                                                       doc="mean: R_i = x_i / stab(Σx) · R"))


# ---------------------------------------------------------------------------------------------
# Scaled dot-product attention (fused kernels): decomposed as AttnLRP does — A·V by the uniform rule
# (V half, A half), the softmax by the AttnLRP rule, QKᵀ by the uniform rule (q and k a quarter each
# of what reaches A·V through A); with cp_lrp only V receives relevance. Recomputed from the saved
# q, k, v and mask, so relevance per head is exact. GQA (fewer k/v heads) is handled by grouping.
# ---------------------------------------------------------------------------------------------
def _sdpa_parts(node):
    q, k, v = (_f32(getattr(node, f"_saved_{n}")) for n in ("query", "key", "value"))
    mask = getattr(node, "_saved_attn_mask", None)
    scale = getattr(node, "_saved_scale", None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    rep = q.shape[-3] // k.shape[-3]
    if rep > 1:
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    if bool(getattr(node, "_saved_is_causal", False)):
        L, S = scores.shape[-2:]
        causal = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        scores = scores.masked_fill(~causal, float("-inf"))
    return q, k, v, scores, scale, rep


def _sdpa_rel(ctx, node, R):
    q, k, v, scores, scale, rep = _sdpa_parts(node)
    A = torch.softmax(scores, -1)
    r = R[0]
    z = torch.matmul(A, v)
    s = r / stab(z, ctx.cfg.eps)
    if ctx.cfg.cp_lrp:
        rv = v * torch.matmul(A.transpose(-1, -2), s)
        ctx.absorb("softmax", r.sum() - rv.sum())
        rq = rk = None
    else:
        rv = 0.5 * v * torch.matmul(A.transpose(-1, -2), s)
        rA = 0.5 * A * torch.matmul(s, v.transpose(-1, -2))
        if ctx.cfg.attn_lrp:
            rS = attn_softmax(scores, A, rA, -1)
            ctx.absorb("softmax", rA.sum() - rS.sum())
        else:
            rS = rA
        qk = scores.masked_fill(A == 0, 0.0)
        t = rS / stab(qk, ctx.cfg.eps)
        rq = 0.5 * q * torch.matmul(t, k) * scale
        rk = 0.5 * k * torch.matmul(t.transpose(-1, -2), q) * scale
    if rep > 1:
        def group(x):
            return None if x is None else x.unflatten(-3, (x.shape[-3] // rep, rep)).sum(-3)
        rk, rv = group(rk), group(rv)
    out = [rq, rk, rv] + [None] * (_n_inputs(node) - 3)
    return [o if ctx.live(node, i) else None for i, o in enumerate(out)]


_SDPA = ("ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductEfficientAttentionBackward0",
         "ScaledDotProductFlashAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0")
register_rule(_SDPA, Rule(_sdpa_rel, lambda ctx, node, k: node._saved_output if k == 0 else None,
                          saved_inputs(query=0, key=1, value=2),
                          doc="fused attention: A·V uniform, AttnLRP softmax, QKᵀ uniform (CP-LRP: V only)"))


def rule_table() -> list[tuple[str, str]]:
    """(operation name, rule formula) for every registered operation."""

    return sorted((name, rule.doc) for name, rule in RULES.items())


# ---------------------------------------------------------------------------------------------
# Sinks. An embedding lookup is where relevance leaves the graph: the engine records its output
# relevance summed over the embedding dimension (one number per token) and stops. The forward is
# registered so promises can rebuild embedding outputs (e.g. for the sum of token and position
# embeddings).
# ---------------------------------------------------------------------------------------------
def _fwd_embedding(ctx, node, k):
    w = ctx.input(node, 0)
    return None if w is None else F.embedding(node._saved_indices, w)


def _sink_rel(ctx, node, R):  # never called: the engine stops at sinks
    return [None] * _n_inputs(node)


register_rule(("EmbeddingBackward0", "EmbeddingBackward1"),
              Rule(_sink_rel, _fwd_embedding, doc="embedding lookup: a sink, token relevance = Σ_d R"))


def _fwd_python_gelu(ctx, node, k):
    x = node.saved_tensors[0] if node.saved_tensors else None
    return None if x is None else F.gelu(x.float(), approximate="tanh")


register_rule("GeLUFunctionBackward", Rule(_identity_rel, _fwd_python_gelu,
                                           lambda node: {0: node.saved_tensors[0]} if node.saved_tensors else {},
                                           doc="BLOOM's custom GELU function: identity rule"))
