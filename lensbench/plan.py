"""`Plan`: a decision about what to remove from a model, shaped like torchao's `FqnToConfig`.

A plan is an ordered mapping `{module name or "re:<regex>": action}`. The action `{"op": "drop"}`
removes that unit (a whole block, or its attention or MLP sublayer); `{"op": "quant", "bits": 4,
"group_size": 128}` stores the weights of the named linear layers (a block or sublayer name means
every linear inside it; an embedding only when named itself) packed at that bit-width. An optional
`"scheme"` names the grid: `"asym"` (the default: min-max with a float zero point), `"sym"` (the
signed symmetric grid that compressed-tensors and GPTQ store) or `"gguf"` (the GGML type the bits
map to, `gpu.ggml.ggml_type`; `group_size` does not apply). As in
torchao's `FqnToConfig`, a later entry overrides an earlier one for the modules both name. It carries the model it was
made for (fingerprint), the policy and budget that produced it, and what the policy predicted.
On disk: JSON, schema `lensbench.plan/1`, written atomically; loading executes nothing.

Checking a plan against a model (`resolve`) happens before any work starts: a plan for another
model, names the model does not have, an unknown operation, or removing every layer are errors.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

from .atomic import write_json
from . import jsonio
from .errors import PlanError

SCHEMA = "lensbench.plan/1"
KINDS = ("block", "attn", "mlp")
OPS = ("drop", "quant")
SCHEMES = ("asym", "sym", "gguf")


class QuantSpec(NamedTuple):
    """How one module is quantised: bit-width, group size (asym/sym) and grid (`SCHEMES`)."""

    bits: int
    group_size: int
    scheme: str = "asym"

    def action(self) -> dict:
        out = {"op": "quant", "bits": int(self.bits)}
        if self.scheme != "gguf":
            out["group_size"] = int(self.group_size)
        if self.scheme != "asym":
            out["scheme"] = self.scheme
        return out


def check_quant(bits, group_size, scheme: str = "asym") -> QuantSpec:
    """A validated QuantSpec; raises QuantError (gpu.quant) or GGMLError naming the nearest choice."""
    from lensbench.gpu.quant import QuantError, check_spec

    if scheme not in SCHEMES:
        raise QuantError(f"scheme {scheme!r} is not known; use one of {', '.join(SCHEMES)}")
    if scheme == "gguf":
        from lensbench.gpu.ggml import GGUF_BITS

        if isinstance(bits, bool) or bits not in GGUF_BITS:
            raise QuantError(f"bits={bits!r} has no GGUF type here; use one of {', '.join(map(str, GGUF_BITS))}")
        return QuantSpec(int(bits), 0, scheme)
    check_spec(bits, group_size)
    return QuantSpec(bits, group_size, scheme)


@dataclass(frozen=True, order=True)
class Unit:
    """A removable unit: block `layer`, or its attention ("attn") or MLP ("mlp") sublayer."""

    layer: int
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}{self.layer}"


def unit_templates(card: dict) -> dict[str, str]:
    """`{"block": "model.layers.{i}", "attn": ..., "mlp": ...}` for a model card (Profile.model)."""
    if "units" not in card:
        raise PlanError(f"the profile of {card.get('name')!r} does not name its layers (made by an older "
                        f"lensbench): re-run lensbench profile")
    return card["units"]


def templates_of(adapter) -> dict[str, str]:
    block = adapter.block_path(0)[:-1] + "{i}"
    return {"block": block, "attn": f"{block}.{adapter.attn}", "mlp": f"{block}.{adapter.mlp}"}


@dataclass
class Plan:
    actions: dict[str, dict]
    model: dict
    policy: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def drop(cls, card: dict, units: Iterable[Unit], *, policy: dict | None = None,
             predicted: dict | None = None) -> "Plan":
        """A plan that removes `units` of the model described by `card` (a Profile's `model`)."""
        names = unit_templates(card)
        ordered = sorted(set(units))
        actions = {names[u.kind].format(i=u.layer): {"op": "drop"} for u in ordered}
        keep = ("name", "fingerprint", "n_layers", "class", "units", "source")
        return cls(actions, {k: card[k] for k in keep if k in card} | {"units": names}, policy or {},
                   predicted or {})

    @classmethod
    def quantize(cls, card: dict, specs: dict[str, tuple], *, policy: dict | None = None,
                 predicted: dict | None = None) -> "Plan":
        """A plan that stores each named module (`{name: (bits, group_size[, scheme])}`) packed."""
        actions = {name: QuantSpec(*spec).action() for name, spec in specs.items()}
        plan = cls.drop(card, [], policy=policy, predicted=predicted)
        plan.actions = actions
        plan.quant_actions()  # validates bits and group sizes
        return plan

    # --- reading --------------------------------------------------------------------------------
    def units(self) -> list[Unit]:
        """The units this plan removes, from its own model card (no model needed)."""
        return sorted(_match(self.actions, self.model["units"], self.model["n_layers"]))

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    def quant_actions(self) -> dict[str, QuantSpec]:
        """`{name or pattern: QuantSpec}` of the quantisation actions, checked for the format."""
        from lensbench.gpu.quant import QuantError

        out = {}
        for key, action in self.actions.items():
            if isinstance(action, dict) and action.get("op") == "quant":
                try:
                    out[key] = check_quant(action.get("bits"), action.get("group_size", 128),
                                           action.get("scheme", "asym"))
                except QuantError as exc:
                    raise PlanError(f"plan entry {key!r}: {exc}") from None
        return out

    def quant_targets(self, model) -> dict[str, QuantSpec]:
        """`{module name: QuantSpec}` for every linear or embedding this plan quantises in
        `model`. Raises PlanError for a name or pattern that matches no such module."""
        from torch import nn

        actions = self.quant_actions()
        if not actions:
            return {}
        modules = dict(model.module.named_modules())
        leaves = {n: m for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding)) or _is_conv1d(m)}
        out: dict[str, QuantSpec] = {}
        for key, spec in actions.items():
            if key.startswith("re:"):
                rx = _regex(key)
                hits = [n for n in leaves if rx.fullmatch(n)]
            elif key in leaves:
                hits = [key]
            elif key in modules:
                hits = [n for n, m in leaves.items() if n.startswith(key + ".") and not isinstance(m, nn.Embedding)]
            else:
                hits = []
            if not hits:
                example = next(n for n, m in leaves.items() if not isinstance(m, nn.Embedding))
                raise PlanError(f"plan quantises {key!r}, but {model.name} has no linear or embedding layer by that "
                                f"name (e.g. {example!r})")
            out.update(dict.fromkeys(hits, spec))
        return out

    def resolve(self, model) -> list[Unit]:
        """Check this plan against `model` and return its units, normalised: a layer whose attention
        and MLP are both removed is a removed block. Quantisation entries are checked too (see
        `quant_targets`). Raises PlanError before any work is done."""
        fp = self.model.get("fingerprint")
        if fp is not None and fp != model.fingerprint():
            raise PlanError(f"this plan was made for {self.model.get('name')!r} (weights {fp[:12]}), not for "
                            f"{model.name!r} (weights {model.fingerprint()[:12]}): make a plan from this model's "
                            f"profile")
        adapter = model.adapter
        units = normalise(_match(self.actions, templates_of(adapter), adapter.n_layers, model.name))
        if any(u.kind != "block" for u in units) and not adapter.sublayer_drop:
            raise PlanError(f"{model.name} ({adapter.family}) is post-norm: its attention and MLP cannot be removed "
                            f"alone; drop whole blocks instead")
        if sum(u.kind == "block" for u in units) >= adapter.n_layers:
            raise PlanError(f"this plan removes all {adapter.n_layers} layers of {model.name}; keep at least one")
        self.quant_targets(model)
        return units

    def summary(self) -> dict:
        units = self.units()
        counts = {k: sum(u.kind == k for u in units) for k in KINDS}
        out = {"n_layers": self.n_layers, **{f"dropped_{k}": v for k, v in counts.items()},
               "layer_fraction_removed": (counts["block"] + 0.5 * (counts["attn"] + counts["mlp"])) / self.n_layers}
        quant = self.quant_actions()
        if quant:
            out["quant_entries"] = {f"int{b}": sum(v[0] == b for v in quant.values())
                                    for b in sorted({v[0] for v in quant.values()})}
            if "average_bits" in self.predicted:
                out["average_bits"] = self.predicted["average_bits"]
        return out

    def to_fqn_config(self) -> dict[str, dict]:
        """The torchao-`FqnToConfig`-shaped mapping (module name -> action)."""
        return dict(self.actions)

    def __repr__(self) -> str:
        s = self.summary()
        quant = "".join(f", {n} x {k}" for k, n in s.get("quant_entries", {}).items())
        return (f"Plan({self.model.get('name')!r}, policy={self.policy.get('name', '?')!r}, drops "
                f"{s['dropped_block']} blocks, {s['dropped_attn']} attention, {s['dropped_mlp']} MLP of "
                f"{s['n_layers']} layers{quant})")

    # --- I/O --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "actions": self.actions, "policy": self.policy,
                "predicted": self.predicted, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> "Plan":
        """Read and validate a plan; with `model`, also check it was made for that model (as `Profile.load`)."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan {path} does not exist: make one with `lensbench plan PROFILE --out {path}`")
        try:
            doc = jsonio.read(path)
        except jsonio.NonFinite as exc:
            raise PlanError(f"{path}: {exc.field} is {exc.literal}, which lensbench never writes: the plan was "
                            f"edited or made elsewhere; make it again with lensbench plan") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path} is not valid JSON ({exc}); it may be truncated: make the plan again") from None
        plan = cls.from_dict(doc, str(path))
        if model is not None:
            plan.resolve(model)
        return plan

    @classmethod
    def from_dict(cls, doc, where: str) -> "Plan":
        """A plan from its JSON document (`to_dict`), validated; `where` names it in errors."""
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise PlanError(f"{where} is not a lensbench plan (schema {SCHEMA!r} expected)")
        if not isinstance(doc.get("actions"), dict) or not isinstance(doc.get("model"), dict) \
                or not {"units", "n_layers"} <= set(doc["model"]):
            raise PlanError(f"{where} is missing its actions or model section: make the plan again")
        plan = cls(doc["actions"], doc["model"], doc.get("policy", {}), doc.get("predicted", {}), doc.get("meta", {}))
        plan.units()  # validates names and ops against the plan's own card
        plan.quant_actions()
        return plan


def normalise(units: Iterable[Unit]) -> list[Unit]:
    """Sorted, at most one unit per layer: a layer whose attention and MLP are both removed, or whose
    block is removed, is one removed block."""
    units = set(units)
    blocks = {u.layer for u in units if u.kind == "block"}
    attn = {u.layer for u in units if u.kind == "attn"} - blocks
    mlp = {u.layer for u in units if u.kind == "mlp"} - blocks
    blocks |= attn & mlp
    return sorted([Unit(i, "block") for i in blocks] + [Unit(i, "attn") for i in attn - blocks]
                  + [Unit(i, "mlp") for i in mlp - blocks])


def _match(actions: dict, templates: dict[str, str], n_layers: int, model_name: str | None = None) -> set[Unit]:
    """Units named by `actions` (exact names or `re:` patterns) under the given name templates."""
    by_name = {templates[k].format(i=i): Unit(i, k) for i in range(n_layers) for k in KINDS}
    units: set[Unit] = set()
    who = model_name or "the model"
    for key, action in actions.items():
        if not isinstance(action, dict) or action.get("op") not in OPS:
            raise PlanError(f"action for {key!r} is {action!r}; supported: " + ", ".join(f'{{"op": "{o}"}}'
                                                                                     for o in OPS))
        if action["op"] != "drop":
            continue
        if key.startswith("re:"):
            rx = _regex(key)
            hits = {u for name, u in by_name.items() if rx.fullmatch(name)}
        else:
            hits = {by_name[key]} if key in by_name else set()
        if not hits:
            raise PlanError(f"plan names {key!r}, which {who} does not have; its units are "
                            f"{templates['block'].format(i='{0..%d}' % (n_layers - 1))} and their "
                            f"{templates['attn'].rsplit('.', 1)[-1]!r} / {templates['mlp'].rsplit('.', 1)[-1]!r}")
        units |= hits
    return units


def _regex(key: str) -> re.Pattern:
    try:
        return re.compile(key[3:])
    except re.error as exc:
        raise PlanError(f"plan pattern {key!r} is not a valid regular expression ({exc})") from None


def _is_conv1d(module) -> bool:
    """GPT-2-style `Conv1D`: a linear layer with its weight stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
