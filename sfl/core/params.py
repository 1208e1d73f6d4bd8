"""Plug-in parameters as configuration sees them, torch-free; the aggregation rules' registrations.

A plug-in's parameters are a keyword-only dataclass (``PluginParams``; a rule's derive from
``RuleParams``, a task's from ``sfl.core.task_params.TaskParams``): typed fields with
defaults, each with its allowed range or values and one line saying what it does (``param``),
checked when the dataclass is built. The rule class names its dataclass (``Rule.Params`` in
``sfl.learning.rules.aggregation``). Rule classes import torch, so the built-in rules'
dataclasses live here, and each built-in is registered here once (``RULES``: name ->
implementation and parameters): ``sfl.core.config`` refuses a bad ``aggregation_params``
wherever configuration is read (cdk synth, the initiator, ``sfl config``) with the same
message the rule would give, without importing torch. A rule named by its import path
keeps its dataclass in its own module and checks its parameters when it is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar


class ParamsError(ValueError):
    """A plug-in's parameters are not a JSON object of values it accepts."""


_RANGE = "range"
_CHOICES = "choices"
_DOC = "doc"
_TYPES: dict[str, type] = {"float": float, "int": int, "bool": bool, "str": str}
_WORDS: dict[type | None, str] = {int: "an integer", float: "a number", str: "a text"}
#: Longest list a list-valued parameter may hold (config values stay small).
MAX_LIST = 64


def param(
    default: Any,
    doc: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A parameter field: its default, one line saying what it does and, for a number (or
    each number of a list), the range it must lie in (``lo``..``hi``, both included), or for
    a text the values it may take (``choices``)."""
    metadata: dict[str, Any] = {_DOC: doc}
    if lo is not None and hi is not None:
        metadata[_RANGE] = (lo, hi)
    if choices is not None:
        metadata[_CHOICES] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def _kind(f: dataclasses.Field[Any]) -> tuple[type | None, bool]:
    """The field's value type, and whether the field is a list of them
    (``tuple[float, ...]``, given in JSON as a list)."""
    if isinstance(f.type, type):
        return f.type, False
    text = str(f.type).replace(" ", "")
    if text.startswith("tuple[") and text.endswith(",...]"):
        return _TYPES.get(text[len("tuple[") : -len(",...]")]), True
    return _TYPES.get(text), False


def allowed(f: dataclasses.Field[Any]) -> str:
    """What a field accepts, in words (for error messages and ``sfl config``)."""
    kind, listed = _kind(f)
    if _CHOICES in f.metadata:
        what = f"one of {', '.join(f.metadata[_CHOICES])}"
    else:
        what = _WORDS.get(kind, f"a {getattr(kind, '__name__', 'value')}")
    if _RANGE in f.metadata:
        lo, hi = f.metadata[_RANGE]
        what += f" from {lo:g} to {hi:g}"
    if listed:
        what = f"a list of up to {MAX_LIST} items, each {what}"
    return what


def _one(f: dataclasses.Field[Any], kind: type | None, value: Any) -> tuple[bool, Any]:
    """Whether one value fits the field, and the value as the field's type."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = True
    if kind is int:
        ok = number and math.isfinite(value) and float(value).is_integer()
    elif kind is float:
        ok = number and math.isfinite(value)
    elif kind is not None:
        ok = isinstance(value, kind)
    if ok and _RANGE in f.metadata:
        lo, hi = f.metadata[_RANGE]
        ok = lo <= value <= hi
    if ok and _CHOICES in f.metadata:
        ok = value in f.metadata[_CHOICES]
    return ok, (kind(value) if ok and kind in (int, float) else value)


def _checked(f: dataclasses.Field[Any], value: Any) -> Any:
    """``value`` as the field's type (an integral number for an int, any number for a
    float, a tuple for a list), or ``ParamsError`` saying what is allowed."""
    kind, listed = _kind(f)
    if listed:
        ok = isinstance(value, list | tuple) and len(value) <= MAX_LIST
        items = [_one(f, kind, v) for v in value] if ok else []
        ok = ok and all(fits for fits, _ in items)
        checked: Any = tuple(v for _, v in items)
    else:
        ok, checked = _one(f, kind, value)
    if not ok:
        raise ParamsError(f"parameter {f.name!r} = {value!r} is not allowed; allowed: {allowed(f)}")
    return checked


P = TypeVar("P", bound="PluginParams")


@dataclass(frozen=True, kw_only=True)
class PluginParams:
    """Base of every plug-in's parameters: each value is checked against its field when built.

    ``KIND`` names the plug-in kind in messages (``aggregation 'krum': ...``); a subclass
    may check its fields together in ``check_together`` (raise ``ParamsError``)."""

    KIND: ClassVar[str] = "plug-in"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))
        self.check_together()

    def check_together(self) -> None:
        """Checks across fields (none by default)."""

    @classmethod
    def from_mapping(cls: type[P], name: str, given: Mapping[str, Any]) -> P:
        """The parameters ``given`` (defaults for the rest); unknown names and values out of
        range are refused, naming the plug-in ``name``."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ParamsError(
                f"{cls.KIND} {name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(known) or 'none'}"
            )
        try:
            return cls(**given)
        except ParamsError as e:
            raise ParamsError(f"{cls.KIND} {name!r}: {e}") from e


def describe_fields(params: type[PluginParams]) -> list[tuple[str, str, str]]:
    """(parameter, default, allowed and meaning) of each field, for ``sfl config`` and docs."""
    rows = []
    for f in dataclasses.fields(params):
        kind, listed = _kind(f)
        if listed:
            default = json.dumps(list(f.default))  # type: ignore[arg-type]
        elif kind is float:
            default = f"{f.default:g}"
        else:
            default = str(f.default)
        rows.append((f.name, default, f"{allowed(f)}: {f.metadata[_DOC]}"))
    return rows


@dataclass(frozen=True, kw_only=True)
class RuleParams(PluginParams):
    """Base of every aggregation rule's parameters."""

    KIND: ClassVar[str] = "aggregation"


# --- the built-in rules' parameters ------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NoParams(RuleParams):
    """A rule without parameters (FedAvg, the coordinate-wise median)."""


@dataclass(frozen=True, kw_only=True)
class FedAvgMParams(RuleParams):
    """FedAvgM (Hsu et al.): server momentum on the pseudo-gradient."""

    server_lr: float = param(1.0, "server learning rate on the pseudo-gradient", lo=1e-6, hi=100.0)
    server_momentum: float = param(0.4, "momentum of the pseudo-gradient", lo=0.0, hi=0.999)


_ETA = "server learning rate: how far the server moves along its optimiser's step"
_TAU = "adaptivity: added to the square root of the second moment"
_BETA_1 = "decay of the first moment (momentum of the pseudo-gradient)"
_BETA_2 = "decay of the second moment"


@dataclass(frozen=True, kw_only=True)
class FedAdagradParams(RuleParams):
    """FedAdagrad (Reddi et al.): no momentum, the second moment sums squared steps."""

    eta: float = param(0.01, _ETA, lo=1e-9, hi=10.0)
    tau: float = param(1e-3, _TAU, lo=1e-12, hi=10.0)


@dataclass(frozen=True, kw_only=True)
class FedAdamParams(RuleParams):
    """FedAdam and FedYogi (Reddi et al.): both moments of the pseudo-gradient."""

    eta: float = param(0.01, _ETA, lo=1e-9, hi=10.0)
    beta_1: float = param(0.9, _BETA_1, lo=0.0, hi=0.999)
    beta_2: float = param(0.99, _BETA_2, lo=0.0, hi=0.99999)
    tau: float = param(1e-3, _TAU, lo=1e-12, hi=10.0)


@dataclass(frozen=True, kw_only=True)
class TrimmedMeanParams(RuleParams):
    """Coordinate-wise trimmed mean (Yin et al. 2018)."""

    trim_fraction: float = param(0.2, "share cut from each tail, per coordinate", lo=0.0, hi=0.49)


@dataclass(frozen=True, kw_only=True)
class KrumParams(RuleParams):
    """Multi-Krum (Blanchard et al. 2017)."""

    byzantine_fraction: float = param(
        0.2, "share of updates assumed hostile (f = floor(share * n))", lo=0.0, hi=0.49
    )
    keep: int = param(0, "updates averaged (Multi-Krum); 0: n - f; 1: Krum", lo=0, hi=10_000)


# --- registration --------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinRule:
    """A built-in rule: where its class lives (imported when used) and its parameters."""

    implementation: str  # 'package.module:Class'
    params: type[RuleParams]


#: Every built-in aggregation rule, registered once (``sfl.core.plugins`` reads it).
RULES: dict[str, BuiltinRule] = {
    "fedavg": BuiltinRule("sfl.learning.rules.aggregation:FedAvg", NoParams),
    "fedavgm": BuiltinRule("sfl.learning.rules.fedopt:FedAvgM", FedAvgMParams),
    "fedadam": BuiltinRule("sfl.learning.rules.fedopt:FedAdam", FedAdamParams),
    "fedyogi": BuiltinRule("sfl.learning.rules.fedopt:FedYogi", FedAdamParams),
    "fedadagrad": BuiltinRule("sfl.learning.rules.fedopt:FedAdagrad", FedAdagradParams),
    "median": BuiltinRule("sfl.learning.rules.robust:Median", NoParams),
    "trimmed_mean": BuiltinRule("sfl.learning.rules.robust:TrimmedMean", TrimmedMeanParams),
    "krum": BuiltinRule("sfl.learning.rules.robust:MultiKrum", KrumParams),
    "clamped_mean": BuiltinRule("sfl.learning.rules.robust:ClampedMean", NoParams),
}


def check(rule: str, given: Mapping[str, Any]) -> RuleParams | None:
    """A built-in rule's parameters, checked; None for a rule named by its import path (it
    checks its own when built: importing it here could import torch)."""
    builtin = RULES.get(rule)
    return None if builtin is None else builtin.params.from_mapping(rule, given)


def describe() -> list[tuple[str, str, str, str]]:
    """(rule, parameter, default, allowed and meaning) for every built-in rule's parameters,
    for ``sfl config`` and the docs."""
    return [
        (rule, *row) for rule, builtin in RULES.items() for row in describe_fields(builtin.params)
    ]


def parse(text: str) -> dict[str, Any]:
    """``aggregation_params`` as a dict: a JSON object (``{}`` for none)."""
    return parse_object(text, "aggregation_params")


def parse_object(text: str, key: str) -> dict[str, Any]:
    """A parameters key (``aggregation_params``, ``task_params``) as a dict: a JSON object
    (``{}`` for none)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise ParamsError(f"{key} {text!r} is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ParamsError(f"{key} {text!r} is not a JSON object")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def canonical(value: str | Mapping[str, Any], key: str = "aggregation_params") -> str:
    """One text for one set of parameters (sorted keys, compact): how config stores them."""
    mapping = parse_object(value, key) if isinstance(value, str) else dict(value)
    return json.dumps(mapping, sort_keys=True, separators=(",", ":"))
