"""The policy registry: a policy turns a Profile (and, for searches, the model) into a Plan under a budget.

A policy is a function `(profile, budget, config, *, model, texts, progress) -> Plan` registered with
`@register(name, Config, budget=..., description=...)`, where `Config` is a frozen dataclass of its options:
each field's type, default and `help` (its metadata) are what `lensbench plan` offers and checks, so an option a
policy does not take, a misspelt one or one of the wrong type is refused in one line before any work.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ...errors import PlanError
from ...executor import ExecutorConfig
from ...profiles import Profile
from ..plan import Plan

_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def option(default: Any, help: str, choices: Sequence | None = None) -> Any:
    """A policy option: its default, its help line and, for a closed set, its choices."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


@dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy's options (a frozen dataclass of `option(...)` fields)."""

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    def check(self, policy: str) -> "PolicyConfig":
        for name, f in self.options().items():
            value, expected = getattr(self, name), _TYPES.get(str(f.type))
            bad_type = expected is not None and (not isinstance(value, expected)
                                                 or (isinstance(value, bool) and f.type != "bool"))
            if bad_type:
                raise PlanError(f"policy {policy!r}: --{_flag(name)} must be {f.type}, got {value!r}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise PlanError(f"policy {policy!r}: --{_flag(name)} {value!r} is not one of "
                                f"{', '.join(map(str, choices))}")
        return self


@dataclass(frozen=True)
class Policy:
    name: str
    fn: Callable[..., Plan]
    config: type[PolicyConfig]
    budget: str
    description: str
    needs_model: bool | Callable[[Profile, PolicyConfig], bool] = False
    sweeps: bool = False  # its fitness evaluations run on an executor's workers (`executor=` is passed to it)

    @property
    def profile_only(self) -> bool:
        """Whether the policy can work from a profile alone with its default options."""
        return self.needs_model is not True

    def runs_model(self, profile: Profile, cfg: PolicyConfig) -> bool:
        """Whether this policy, with these options, needs the model (and calibration texts for searches)."""
        return self.needs_model(profile, cfg) if callable(self.needs_model) else self.needs_model

    def check_executor(self, executor: ExecutorConfig | None) -> None:
        """Refuse workers for a policy that runs in this process."""
        if executor is not None and executor.kind != "serial" and not self.sweeps:
            sweeping = ", ".join(n for n, p in POLICIES.items() if p.sweeps)
            raise PlanError(f"policy {self.name!r} runs in this process, not on workers: drop --executor (the "
                            f"searches {sweeping} take it)")

    def configure(self, options: dict[str, Any]) -> PolicyConfig:
        """The typed config from keyword options (None means "not given"); unknown names are refused."""
        accepted = self.config.options()
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            takes = ", ".join("--" + _flag(k) for k in sorted(accepted)) or "no options"
            raise PlanError(f"policy {self.name!r} does not take {', '.join('--' + _flag(k) for k in unknown)}; "
                            f"it takes {takes}")
        return self.config(**given).check(self.name)


POLICIES: dict[str, Policy] = {}


def register(name: str, config: type[PolicyConfig], *, budget: str, description: str,
             needs_model: bool | Callable[[Profile, PolicyConfig], bool] = False, sweeps: bool = False):
    """Register a policy function under `name` with its options dataclass. `needs_model` may depend on the
    profile and the options (an iterative drop runs the model; a bit policy reads the linears from it when the
    profile does not list them). A policy that `sweeps` takes `executor=` and runs its evaluations there."""
    def deco(fn):
        POLICIES[name] = Policy(name, fn, config, budget, description, needs_model, sweeps)
        return fn
    return deco


def make_plan(name: str, profile: Profile, budget: float, *, model=None, texts: Sequence[str] | None = None,
              progress: bool = False, config: PolicyConfig | None = None, executor: ExecutorConfig | None = None,
              **options) -> Plan:
    """The Plan that policy `name` makes from `profile` under `budget`; see `plan`."""
    if name not in POLICIES:
        raise PlanError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
    policy = POLICIES[name]
    if isinstance(texts, str):  # one calibration text, never one text per character
        texts = [texts]
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise PlanError(f"budget {budget!r} is not a number: {policy.budget}") from None
    if config is not None:
        if not isinstance(config, policy.config):
            raise PlanError(f"policy {name!r} takes a {policy.config.__name__}, not a {type(config).__name__}")
        if options:
            raise PlanError("give the options either in config= or as keywords, not both")
        cfg = config.check(name)
        given = {k: v for k, v in dataclasses.asdict(cfg).items() if v != policy.config.options()[k].default}
    else:
        cfg = policy.configure(options)
        given = {k: v for k, v in options.items() if v is not None}
    if model is None and policy.runs_model(profile, cfg):
        iterative = getattr(cfg, "iterative", False)
        what = (f"{' (iterative)' if iterative else ''} runs the model" if iterative or policy.needs_model is True
                else " reads the blocks' linears from the model, as this profile does not list them (profile with "
                     "--analyses quant_sensitivity to record them)")
        raise PlanError(f"policy {name!r}{what}: give the model (lensbench plan ... --model SOURCE)")
    policy.check_executor(executor)
    if model is not None:
        profile.check_model(model)
    extra = {"executor": executor} if policy.sweeps else {}
    plan = policy.fn(profile, budget, cfg, model=model, texts=texts, progress=progress, **extra)
    plan.policy = {"name": name, "budget": budget, **given}
    return plan


def plan(profile: Profile, policy: str, budget: float, *, model=None, texts: Sequence[str] | None = None,
         progress: bool = False, config: PolicyConfig | None = None, executor: ExecutorConfig | None = None,
         **options) -> Plan:
    """The Plan that `policy` makes from `profile` under `budget` (`lensbench.plan`), with the policy's options
    as keywords or as its options dataclass (`config=`). Searches, an iterative drop, and bit policies whose
    profile does not list the linears run `model` (on `texts`, calibration text); the searches (evo, evo-bits)
    score their candidates on an `executor`'s workers when given one, with the same result as serially at the
    workers' thread count.

        >>> plan = lb.plan(profile, "drop-block", 1, ranking="redundancy")
        >>> len(plan.units())
        1
        >>> from lensbench.compress.policies import DropOptions
        >>> plan = lb.plan(profile, "drop-block", 1, config=DropOptions(ranking="random", seed=1))
    """
    return make_plan(policy, profile, budget, model=model, texts=texts, progress=progress, config=config,
                     executor=executor, **options)


def quiet_plan(name: str, profile: Profile, budget: float, **options) -> Plan | None:
    """A plan from another policy, or None when the profile cannot make it (search seeds)."""
    try:
        return make_plan(name, profile, budget, **options)
    except PlanError:
        return None


def _flag(name: str) -> str:
    return name.replace("_", "-")
