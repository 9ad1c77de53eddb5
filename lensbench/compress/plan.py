"""`Plan`: a decision about what to remove or quantise in a model, shaped like torchao's `FqnToConfig`.

A plan maps module names (or `"re:<regex>"` patterns) to typed actions, each registered under its operation
name (`@action(op)`): `Drop()` removes that unit (a whole block, or its attention or MLP sublayer);
`Quant(bits, group_size, scheme)` stores the weights of the named linear layers (a block or sublayer name
means every linear inside it; an embedding only when named itself) packed at that bit-width. The scheme names
the grid: `"asym"` (the default: min-max with a float zero point), `"sym"` (the signed symmetric grid that
compressed-tensors and GPTQ store) or `"gguf"` (the GGML type the bits map to, `gpu.ggml.ggml_type`;
`group_size` does not apply). `KV(k_bits, v_bits, axis, group, window)` keeps the KV cache of the named
attention layers (or blocks) packed at those bits during decoding (`lensbench.kvcache`). When two entries of
one kind name the same module, the later one wins. A plan
carries the model it was made for (fingerprint), the policy and budget that produced it, and what the policy
predicted. On disk: JSON, schema `lensbench.plan/1`, each action `{"op": ..., its fields}`, written
atomically; loading executes nothing.

Checking a plan against a model (`bind`, `resolve`) happens before any work starts: a plan for another
model, names the model does not have, an unknown operation, or removing every layer are errors.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, NamedTuple

from torch import nn

from .. import jsonio
from ..atomic import write_json
from ..errors import LensbenchError, PlanError
from ..kvcache import KVSpec
from ..gpu.ggml import GGUF_BITS
from ..gpu.mixed import check_group_bits
from ..gpu.quant import DEFAULT_GROUP_SIZE, QuantError, check_spec
from ..units import KINDS, Unit, is_conv1d, normalise, templates_of, unit_templates

SCHEMA = "lensbench.plan/1"
SCHEMES = ("asym", "sym", "gguf")
METHODS = ("rtn", "gptq")  # round-to-nearest; GPTQ from calibration Hessians (`compress.gptq`)


# --- actions ------------------------------------------------------------------------------------------

class Action:
    """A typed plan action; subclasses are frozen dataclasses registered with `@action(op)`."""

    op: ClassVar[str]

    def to_dict(self) -> dict:
        return {"op": self.op}

    @classmethod
    def from_dict(cls, doc: dict) -> "Action":
        return cls()


ACTIONS: dict[str, type[Action]] = {}


def action(op: str):
    """Register an action class under its operation name (the `"op"` of its JSON form)."""
    def deco(cls):
        cls.op = op
        ACTIONS[op] = cls
        return cls
    return deco


@action("drop")
@dataclass(frozen=True)
class Drop(Action):
    """Remove the named unit: a whole block, or its attention or MLP sublayer."""


@action("quant")
@dataclass(frozen=True, order=True)
class Quant(Action):
    """Store the named linears (or an embedding) packed: bit-width, group size (asym/sym), grid and rounding
    (`rtn`, or `gptq` from calibration Hessians). Unpacks as `bits, group_size, scheme = quant`.

    `group_bits` gives one width per input group of one linear (BAQ's allocation, `compress.baq`); `bits` is
    then the widest of them, and the linear is held as one packed part per width (`gpu.mixed`)."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    scheme: str = "asym"
    method: str = "rtn"
    group_bits: tuple[int, ...] = ()

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise QuantError(f"scheme {self.scheme!r} is not known; use one of {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise QuantError(f"method {self.method!r} is not known; use one of {', '.join(METHODS)}")
        if self.scheme == "gguf":
            if isinstance(self.bits, bool) or self.bits not in GGUF_BITS:
                raise QuantError(f"bits={self.bits!r} has no GGUF type here; use one of "
                                 f"{', '.join(map(str, GGUF_BITS))}")
            object.__setattr__(self, "group_size", 0)
        else:
            check_spec(self.bits, self.group_size)
        if self.group_bits:
            self._check_group_bits()
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "group_size", int(self.group_size))

    def _check_group_bits(self) -> None:
        widths = self.group_bits
        if isinstance(widths, (str, bytes)) or not all(isinstance(b, int) and not isinstance(b, bool)
                                                       for b in widths):
            raise QuantError(f"group_bits must be a list of bit-widths, got {widths!r}")
        if self.scheme == "gguf" or self.group_size <= 0:
            raise QuantError("per-group bit-widths need the asym or sym scheme with a positive group size")
        for b in widths:
            check_spec(b, self.group_size)
        object.__setattr__(self, "group_bits", tuple(widths))
        if self.bits != max(widths):
            raise QuantError(f"bits={self.bits} must be the widest of group_bits ({max(widths)})")

    def check_inputs(self, name: str, in_features: int) -> None:
        """One line when `group_bits` does not hold one width per input group of linear `name`."""
        if self.group_bits:
            check_group_bits(self.group_bits, self.group_size, in_features, name)

    def __iter__(self):  # the grid: what simulated quantisation and the exporters read
        return iter((self.bits, self.group_size, self.scheme))

    def to_dict(self) -> dict:
        out = {"op": "quant", "bits": self.bits}
        if self.scheme != "gguf":
            out["group_size"] = self.group_size
        if self.scheme != "asym":
            out["scheme"] = self.scheme
        if self.method != "rtn":
            out["method"] = self.method
        if self.group_bits:
            out["group_bits"] = list(self.group_bits)
        return out

    @classmethod
    def from_dict(cls, doc: dict) -> "Quant":
        widths = doc.get("group_bits", ())
        return cls(doc.get("bits"), doc.get("group_size", DEFAULT_GROUP_SIZE), doc.get("scheme", "asym"),
                   doc.get("method", "rtn"), tuple(widths) if isinstance(widths, list) else widths)




@action("kv")
@dataclass(frozen=True)
class KV(KVSpec, Action):
    """Keep the named attention layers' KV cache packed: key and value bits in {8, 4, 2}, per-token or
    KIVI per-channel keys (`axis`, `group`), and a full-precision window of recent tokens."""

    def to_dict(self) -> dict:
        default = KVSpec()
        return {"op": "kv", "k_bits": self.k_bits, "v_bits": self.v_bits,
                **{f: getattr(self, f) for f in ("axis", "group", "window") if getattr(self, f) != getattr(default, f)}}

    @classmethod
    def from_dict(cls, doc: dict) -> "KV":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(doc) - fields - {"op"}
        if unknown:
            raise TypeError(f"unknown KV fields {sorted(unknown)}; KV takes {sorted(fields)}")
        return cls(**{k: v for k, v in doc.items() if k != "op"})


def to_action(key: str, value) -> Action:
    """An Action from an Action or its JSON form; PlanError names the entry and the supported operations."""
    if isinstance(value, Action):
        return value
    if not isinstance(value, dict) or value.get("op") not in ACTIONS:
        raise PlanError(f"action for {key!r} is {value!r}; supported: "
                        + ", ".join(f'{{"op": "{o}"}}' for o in ACTIONS))
    try:
        return ACTIONS[value["op"]].from_dict(value)
    except (LensbenchError, TypeError) as exc:
        raise PlanError(f"plan entry {key!r}: {exc}") from None


class Bound(NamedTuple):
    """A plan checked against one model: its removed units (normalised), `{module name: Quant}` and
    `{layer: KV}`."""

    plan: "Plan"
    units: list[Unit]
    quant: dict[str, Quant]
    kv: dict[int, KV] = {}
    allow_slow: bool = False  # `apply`: a packed weight no kernel runs on its device may take the reference path


# --- the plan -----------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Module names (or `re:` patterns) to typed actions, with the model card, policy and prediction.

        >>> plan = lb.Plan.drop(profile.model, [Unit(1, "block")])    # Unit: lensbench.units
        >>> plan.units()                                              # read without the model
        [Unit(layer=1, kind='block')]
        >>> path = plan.save(tmp / "plan.json")
        >>> lb.Plan.load(path, model=model).actions == plan.actions
        True
        >>> mixed = lb.Plan.quantize(plan.model, {"model.layers.1": lb.Quant(4, 32), "model.layers.2": (8, 32)})
        >>> mixed.to_fqn_config()["model.layers.1"]
        {'op': 'quant', 'bits': 4, 'group_size': 32}
    """

    actions: dict[str, Action]
    model: dict
    policy: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.actions = {k: to_action(k, v) for k, v in self.actions.items()}

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def drop(cls, card: dict, units: Iterable[Unit], *, policy: dict | None = None,
             predicted: dict | None = None) -> "Plan":
        """A plan that removes `units` of the model described by `card` (a Profile's `model`)."""
        names = unit_templates(card)
        actions = {names[u.kind].format(i=u.layer): Drop() for u in sorted(set(units))}
        keep = ("name", "fingerprint", "n_layers", "class", "units", "source")
        return cls(actions, {k: card[k] for k in keep if k in card} | {"units": names}, policy or {},
                   predicted or {})

    @classmethod
    def quantize(cls, card: dict, specs: dict[str, tuple | Quant], *, policy: dict | None = None,
                 predicted: dict | None = None) -> "Plan":
        """A plan that stores each named module (`{name: Quant or (bits, group_size[, scheme])}`) packed."""
        plan = cls.drop(card, [], policy=policy, predicted=predicted)
        try:
            plan.actions = {n: s if isinstance(s, Quant) else Quant(*s) for n, s in specs.items()}
        except QuantError as exc:
            raise PlanError(str(exc)) from None
        return plan

    # --- reading --------------------------------------------------------------------------------
    def units(self) -> list[Unit]:
        """The units this plan removes, from its own model card (no model needed)."""
        return sorted(_match(self.actions, self.model["units"], self.model["n_layers"]))

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    def quant_actions(self) -> dict[str, Quant]:
        """`{name or pattern: Quant}` of the quantisation actions."""
        return {k: a for k, a in self.actions.items() if isinstance(a, Quant)}

    def kv_actions(self) -> dict[str, KV]:
        """`{name or pattern: KV}` of the KV-cache actions."""
        return {k: a for k, a in self.actions.items() if isinstance(a, KV)}

    def kv_targets(self, model) -> dict[int, KV]:
        """`{layer: KV}` for every attention layer whose cache this plan quantises (a block's name or its
        attention's; the later entry wins). Raises PlanError for a name that matches no layer, and for a
        model without a KV cache."""
        actions = self.kv_actions()
        if not actions:
            return {}
        if not model.is_causal_lm:
            raise PlanError(f"this plan quantises the KV cache, but {model.name} is an encoder and has no KV cache: "
                            f"remove its kv entries")
        names = templates_of(model.adapter)
        by_name = {names[k].format(i=i): i for i in range(model.n_layers) for k in ("block", "attn")}
        out: dict[int, KV] = {}
        for key, spec in actions.items():
            hits = ([i for n, i in by_name.items() if _regex(key).fullmatch(n)] if key.startswith("re:")
                    else [by_name[key]] if key in by_name else [])
            if not hits:
                raise PlanError(f"plan keeps the KV cache of {key!r} packed, but {model.name} has no block or "
                                f"attention by that name (e.g. {names['attn'].format(i=0)!r})")
            out.update(dict.fromkeys(hits, spec))
        return dict(sorted(out.items()))

    def with_method(self, method: str) -> "Plan":
        """The same plan with every quantisation entry rounded by `method` ("rtn" or "gptq")."""
        try:
            actions = {k: dataclasses.replace(a, method=method) if isinstance(a, Quant) else a
                       for k, a in self.actions.items()}
        except QuantError as exc:
            raise PlanError(str(exc)) from None
        meta = {k: v for k, v in self.meta.items() if k != "database"}  # its levels are of the recorded method
        return Plan(actions, self.model, dict(self.policy), dict(self.predicted), meta)

    def quant_targets(self, model) -> dict[str, Quant]:
        """`{module name: Quant}` for every linear or embedding this plan quantises in `model`. Raises
        PlanError for a name or pattern that matches no such module."""
        actions = self.quant_actions()
        if not actions:
            return {}
        modules = dict(model.module.named_modules())
        leaves = {n: m for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding)) or is_conv1d(m)}
        out: dict[str, Quant] = {}
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
            if spec.group_bits:
                for name in hits:
                    _check_group_widths(name, leaves[name], spec)
            out.update(dict.fromkeys(hits, spec))
        return out

    def resolve(self, model) -> list[Unit]:
        """Check this plan against `model` and return its units, normalised: a layer whose attention
        and MLP are both removed is a removed block. Quantisation entries are checked too (see
        `quant_targets`). Raises PlanError before any work is done."""
        return self.bind(model).units

    def bind(self, model) -> Bound:
        """This plan checked against `model`, resolved once into its units and quantisation targets."""
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
        return Bound(self, units, self.quant_targets(model), self.kv_targets(model))

    def summary(self) -> dict:
        units = self.units()
        counts = {k: sum(u.kind == k for u in units) for k in KINDS}
        out = {"n_layers": self.n_layers, **{f"dropped_{k}": v for k, v in counts.items()},
               "layer_fraction_removed": (counts["block"] + 0.5 * (counts["attn"] + counts["mlp"])) / self.n_layers}
        quant = self.quant_actions()
        if quant:
            out["quant_entries"] = {f"int{b}": sum(v.bits == b for v in quant.values())
                                    for b in sorted({v.bits for v in quant.values()})}
            if "average_bits" in self.predicted:
                out["average_bits"] = self.predicted["average_bits"]
        kv = self.kv_actions()
        if kv:
            names = sorted({a.name for a in kv.values()})
            out["kv_entries"] = {name: sum(a.name == name for a in kv.values()) for name in names}
            if "kv_bits" in self.predicted:
                out["kv_bits"] = self.predicted["kv_bits"]
        return out

    def to_fqn_config(self) -> dict[str, dict]:
        """The torchao-`FqnToConfig`-shaped mapping (module name -> action, in its JSON form)."""
        return {k: a.to_dict() for k, a in self.actions.items()}

    def __repr__(self) -> str:
        s = self.summary()
        quant = "".join(f", {n} x {k}" for k, n in {**s.get("quant_entries", {}), **s.get("kv_entries", {})}.items())
        return (f"Plan({self.model.get('name')!r}, policy={self.policy.get('name', '?')!r}, drops "
                f"{s['dropped_block']} blocks, {s['dropped_attn']} attention, {s['dropped_mlp']} MLP of "
                f"{s['n_layers']} layers{quant})")

    # --- I/O --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "actions": self.to_fqn_config(), "policy": self.policy,
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
        plan = cls.from_dict(jsonio.read_document(path, PlanError, "make the plan again with lensbench plan"),
                             str(path))
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
        plan.units()  # validates names against the plan's own card
        return plan


def _check_group_widths(name: str, module: nn.Module, spec: Quant) -> None:
    """Per-group widths fit linear `name` (one per input group); an embedding takes one width."""
    if isinstance(module, nn.Embedding):
        raise PlanError(f"plan gives {name} per-group bit-widths, which an embedding does not take: give it one "
                        f"bits value")
    try:
        spec.check_inputs(name, module.weight.shape[0 if is_conv1d(module) else 1])
    except QuantError as exc:
        raise PlanError(str(exc)) from None


def _match(actions: dict[str, Action], templates: dict[str, str], n_layers: int,
           model_name: str | None = None) -> set[Unit]:
    """Units named by the Drop actions (exact names or `re:` patterns) under the given name templates."""
    by_name = {templates[k].format(i=i): Unit(i, k) for i in range(n_layers) for k in KINDS}
    units: set[Unit] = set()
    who = model_name or "the model"
    for key, act in actions.items():
        if not isinstance(act, Drop):
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
