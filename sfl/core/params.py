"""The parameters of the built-in aggregation rules: names, defaults and allowed ranges.

Torch-free, so ``sfl.core.config`` can refuse a bad ``aggregation_params`` wherever the
configuration is read (cdk synth, the initiator, ``sfl config``) with the same message the
rule itself would give. A custom rule (an import path) checks its own parameters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ParamsError(ValueError):
    """``aggregation_params`` is not a JSON object of numbers the rule accepts."""


@dataclass(frozen=True)
class Param:
    default: float
    lo: float
    hi: float
    doc: str
    integer: bool = False

    def check(self, rule: str, name: str, value: Any) -> float:
        kind = "an integer" if self.integer else "a number"
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and self.integer:
            ok = float(value).is_integer()
        if not ok or not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise ParamsError(
                f"aggregation {rule!r}: parameter {name!r} = {value!r} is not allowed; "
                f"allowed: {kind} from {self.lo:g} to {self.hi:g}"
            )
        return int(value) if self.integer else float(value)


_ETA = "server learning rate: how far the server moves along its optimiser's step"
_TAU = "adaptivity: added to the square root of the second moment"
_BETA_1 = "decay of the first moment (momentum of the pseudo-gradient)"
_BETA_2 = "decay of the second moment"

RULE_PARAMS: dict[str, dict[str, Param]] = {
    "fedavg": {},
    "fedavgm": {
        "server_lr": Param(1.0, 1e-6, 100.0, "server learning rate on the pseudo-gradient"),
        "server_momentum": Param(0.4, 0.0, 0.999, "momentum of the pseudo-gradient"),
    },
    "fedadam": {
        "eta": Param(0.01, 1e-9, 10.0, _ETA),
        "beta_1": Param(0.9, 0.0, 0.999, _BETA_1),
        "beta_2": Param(0.99, 0.0, 0.99999, _BETA_2),
        "tau": Param(1e-3, 1e-12, 10.0, _TAU),
    },
    "fedyogi": {
        "eta": Param(0.01, 1e-9, 10.0, _ETA),
        "beta_1": Param(0.9, 0.0, 0.999, _BETA_1),
        "beta_2": Param(0.99, 0.0, 0.99999, _BETA_2),
        "tau": Param(1e-3, 1e-12, 10.0, _TAU),
    },
    "fedadagrad": {
        "eta": Param(0.01, 1e-9, 10.0, _ETA),
        "tau": Param(1e-3, 1e-12, 10.0, _TAU),
    },
    "median": {},
    "trimmed_mean": {
        "trim_fraction": Param(0.2, 0.0, 0.49, "share cut from each tail, per coordinate"),
    },
    "krum": {
        "byzantine_fraction": Param(
            0.2, 0.0, 0.49, "share of updates assumed hostile (f = floor(share * n))"
        ),
        "keep": Param(
            0, 0, 10_000, "updates averaged (Multi-Krum); 0: n - f; 1: Krum", integer=True
        ),
    },
}


def describe() -> list[tuple[str, str, str, str]]:
    """(rule, parameter, default, allowed and meaning) for every built-in rule's parameters,
    for ``sfl config`` and the docs."""
    rows = []
    for rule, specs in RULE_PARAMS.items():
        for name, spec in specs.items():
            kind = "an integer" if spec.integer else "a number"
            default = str(int(spec.default)) if spec.integer else f"{spec.default:g}"
            rows.append(
                (rule, name, default, f"{kind} from {spec.lo:g} to {spec.hi:g}: {spec.doc}")
            )
    return rows


def parse(text: str) -> dict[str, Any]:
    """``aggregation_params`` as a dict: a JSON object (``{}`` for none)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise ParamsError(f"aggregation_params {text!r} is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ParamsError(f"aggregation_params {text!r} is not a JSON object")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def resolve(rule: str, given: Mapping[str, Any]) -> dict[str, float]:
    """The rule's parameters: its defaults, overridden by ``given``; unknown names and
    out-of-range values are refused. A rule not listed here (an import path) gets ``given``
    unchanged, to check itself."""
    specs = RULE_PARAMS.get(rule)
    if specs is None:
        return dict(given)
    unknown = sorted(set(given) - set(specs))
    if unknown:
        known = ", ".join(specs) or "none"
        raise ParamsError(
            f"aggregation {rule!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"known: {known}"
        )
    return {
        name: spec.check(rule, name, given[name]) if name in given else spec.default
        for name, spec in specs.items()
    }


def canonical(value: str | Mapping[str, Any]) -> str:
    """One text for one set of parameters (sorted keys, compact): how config stores them."""
    mapping = parse(value) if isinstance(value, str) else dict(value)
    return json.dumps(mapping, sort_keys=True, separators=(",", ":"))
