"""`bits-baq`: BAQ's bit-widths across the input groups of every block linear (`compress.baq`), each linear at the
average budget, from GPTQ column losses on calibration Hessians.

The Hessians come from a GPTQ database (`--database`: the dense model's, saved there) or from the model run on
the calibration texts (the same dense pass). The plan gives each linear its per-group widths (`Quant.group_bits`)
with method gptq, so evaluate and compress run GPTQ at exactly those widths (from the database's Hessians when
the plan records one, else sequentially on calibration text, as for any gptq plan).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm import tqdm

from ...errors import PlanError
from ...gpu.quant import QuantError
from ...profiles import Profile
from ...simquant import block_linears
from ...texts import bbc_news
from ..baq import BAQConfig, baq_weight, reference_bits
from ..database import Database
from ..gptq import GPTQConfig, block_hessians, check_targets, weight_of
from ..plan import Plan, Quant
from .bits import GridOptions, grid_setup, recorded
from .budgets import check_average, levels as parse_levels
from .registry import option, register


@dataclass(frozen=True)
class BitsBaqOptions(GridOptions):
    levels: str = option("2,3,4,8", "the bit-widths a group may take")
    reference: int = option(0, "the width of the GPTQ pass that measures the column losses (0: the level at or "
                               "below the budget)")


@register("bits-baq", BitsBaqOptions, needs_model=True,
          budget="average weight bits of every block linear (each linear on its own, as BAQ does)",
          description="BAQ: bit-widths across each linear's input groups from GPTQ column losses (reverse "
                      "water-filling)")
def bits_baq(profile: Profile, budget: float, cfg: BitsBaqOptions, *, model, texts, progress) -> Plan:
    if cfg.method != "gptq":
        raise PlanError("bits-baq allocates bits from GPTQ's column losses and writes GPTQ entries: add --method gptq")
    opts = sorted(parse_levels(cfg.levels, None, cfg.scheme))
    check_average(budget, opts[0], opts[-1])
    if cfg.reference and cfg.reference not in opts:
        raise PlanError(f"--reference {cfg.reference} is not one of the levels {cfg.levels}")
    profile, db = grid_setup(profile, cfg, opts)
    baq = BAQConfig(tuple(opts), cfg.reference or reference_bits(budget, opts))
    ad = model.adapter
    names = [f"{ad.block_path(i)}.{n}" for i in range(model.n_layers) for n in block_linears(model)]
    check_targets(model, names)
    specs, stats = {}, {"weights": 0, "bits": 0.0, "error": 0.0, "reference_error": 0.0, "rtn_error": 0.0}
    bar = tqdm(total=len(names), desc="BAQ", unit="linear", disable=not progress, file=sys.stderr, leave=False)
    for name, module, hessian in _hessians(model, names, db, texts):
        try:
            r = baq_weight(weight_of(module), hessian, budget, cfg.group_size, cfg.scheme == "sym",
                           GPTQConfig(**db.settings["gptq"]) if db else GPTQConfig(), baq)
        except QuantError as exc:
            raise PlanError(f"{name}: {exc}") from None
        widths = r.group_bits
        specs[name] = (Quant(widths[0], cfg.group_size, cfg.scheme, "gptq") if len(set(widths)) == 1 else
                       Quant(max(widths), cfg.group_size, cfg.scheme, "gptq", tuple(widths)))
        n = module.weight.numel()
        stats["weights"] += n
        stats["bits"] += r.rate * n
        stats["error"] += r.result.error
        stats["reference_error"] += r.reference.error
        stats["rtn_error"] += r.result.rtn_error
        bar.update(1)
    bar.close()
    mixed = sum(bool(q.group_bits) for q in specs.values())
    predicted = {"average_bits": stats["bits"] / stats["weights"], "reference_bits": baq.reference,
                 "mixed_linears": mixed, "linears": len(specs),
                 "layer_error_vs_reference_gptq": stats["error"] / max(stats["reference_error"], 1e-30),
                 "layer_error_vs_rtn": stats["error"] / max(stats["rtn_error"], 1e-30)}
    return recorded(Plan.quantize(profile.model, specs, predicted=predicted), db)


def _hessians(model, names: list[str], db: Database | None, texts):
    """(name, module, its calibration Hessian) of every linear in `names`: the database's, or from one dense pass
    of the model on `texts` (the module is in memory while the caller holds it)."""
    root = model.module
    if db is not None:
        for name in names:
            yield name, root.get_submodule(name), db.hessian(name)
        return
    texts = list(texts) if texts else bbc_news("calibration", limit=32)
    for _, mine, h, _ in block_hessians(model, names, texts, GPTQConfig()):
        for name, module in mine.items():
            yield name, module, h[name]
