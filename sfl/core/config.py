"""The federation's configuration: every knob, its typed default and what values it allows.

One definition feeds the CDK stack (``cdk.json`` context key ``sfl``), the Lambdas'
environment (``SFL_*`` variables), the Greengrass component's default configuration and the
local simulation. A bad value fails early with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sfl.core import params as rule_params
from sfl.core import plugins
from sfl.core.compressed_layout import DEFAULT_TOPK_FRACTION, MIN_TOPK_FRACTION, UPDATE_CODECS

CONTEXT_KEY = "sfl"
ENV_PREFIX = "SFL_"

EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: Keys fixed at deploy time: the experiment names every record, the task fixes the model's
#: shape, and devices read heartbeat and poll periods from their component configuration.
#: Every other key may change between rounds (``sfl config set``, ``sfl.state.control``).
DEPLOY_TIME_KEYS = frozenset({"experiment", "task", "heartbeat_seconds", "poll_seconds"})


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def _one_of(kind: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: plugins.is_valid(kind, v), f"one of {plugins.allowed(kind)}")


def _range(lo: float, hi: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: lo <= v <= hi, f"a number from {lo:g} to {hi:g}")


def _spec(check: tuple[Callable[[Any], bool], str], doc: str) -> dict[str, Any]:
    return {"check": check[0], "allowed": check[1], "doc": doc}


@dataclass(frozen=True)
class FederationConfig:
    """How rounds run. Field metadata holds each key's check, allowed values and meaning."""

    experiment: str = field(
        default="default",
        metadata=_spec(
            (lambda v: bool(EXPERIMENT_NAME.match(v)), "1-64 letters, digits, '_' or '-'"),
            "name of the training run; rounds are numbered per experiment",
        ),
    )
    task: str = field(
        default="digits",
        metadata=_spec(_one_of("task"), "training task (model, data, train, evaluate)"),
    )
    selection: str = field(
        default="fast_clients",
        metadata=_spec(_one_of("selection"), "how the initiator picks clients"),
    )
    aggregation: str = field(
        default="fedavg",
        metadata=_spec(_one_of("aggregation"), "how updates become the next model"),
    )
    aggregation_params: str = field(
        default="{}",
        metadata=_spec(
            (lambda v: True, "a JSON object of the rule's parameters (see docs/strategies.md)"),
            'parameters of the aggregation rule, e.g. {"eta": 0.01} for fedadam',
        ),
    )
    quorum: str = field(
        default="min_fraction",
        metadata=_spec(_one_of("quorum"), "when a round may aggregate"),
    )
    fraction: float = field(
        default=1.0,
        metadata=_spec(_range(0.01, 1.0), "share of active clients picked per round"),
    )
    clients_per_round: int = field(
        default=0,
        metadata=_spec(_range(0, 10_000), "clients picked per round; 0 means use 'fraction'"),
    )
    min_clients: int = field(
        default=1,
        metadata=_spec(_range(1, 10_000), "fewest active clients needed to start a round"),
    )
    min_answered_fraction: float = field(
        default=0.5,
        metadata=_spec(
            _range(0.0, 1.0),
            "'min_fraction' quorum: share of selected clients whose accepted updates suffice "
            "once the soft deadline has passed",
        ),
    )
    min_accepted: int = field(
        default=1,
        metadata=_spec(_range(1, 10_000), "'min_fraction' quorum: fewest accepted updates"),
    )
    ewma_b: float = field(
        default=0.8,
        metadata=_spec(_range(0.0, 0.999), "weight of the past in each client's turnaround EWMA"),
    )
    selection_exploration: float = field(
        default=0.2,
        metadata=_spec(
            _range(0.0, 1.0),
            "'utility' and 'fast_clients': share of each round's picks reserved for clients "
            "not picked in the last selection_window rounds (or never)",
        ),
    )
    selection_max_share: float = field(
        default=0.9,
        metadata=_spec(
            _range(0.05, 1.0),
            "'utility' and 'fast_clients': a client picked in more than this share of the "
            "last selection_window rounds sits the next one out, if others can take its "
            "place; 1 turns the cap off",
        ),
    )
    selection_window: int = field(
        default=10,
        metadata=_spec(
            _range(1, 1_000), "rounds over which recent picks are counted and staleness is judged"
        ),
    )
    selection_speed_exponent: float = field(
        default=4.0,
        metadata=_spec(
            _range(0.0, 10.0),
            "'utility': a client slower than the round's preferred turnaround weighs "
            "(preferred / its turnaround) ** this; 0 ignores speed",
        ),
    )
    round_soft_deadline_seconds: int = field(
        default=600,
        metadata=_spec(
            _range(1, 86_400),
            "seconds after which a round may aggregate without every selected client",
        ),
    )
    round_deadline_seconds: int = field(
        default=900,
        metadata=_spec(
            _range(1, 86_400), "hard deadline: a round still without quorum is abandoned"
        ),
    )
    aggregation_lease_seconds: int = field(
        default=300,
        metadata=_spec(_range(5, 3_600), "seconds an aggregation may run before others retry it"),
    )
    aggregation_in_flight: int = field(
        default=4,
        metadata=_spec(
            _range(1, 64),
            "updates the averager downloads and decodes ahead of the one it is summing "
            "(memory: this many plus one updates)",
        ),
    )
    aggregation_shard_above: int = field(
        default=0,
        metadata=_spec(
            _range(0, 1_000_000),
            "with more accepted updates than this, FedAvg and the FedOpt rules sum shards "
            "in parallel Lambda invocations, then reduce; 0 never shards",
        ),
    )
    aggregation_shard_size: int = field(
        default=250,
        metadata=_spec(_range(2, 100_000), "updates summed by one shard invocation"),
    )
    active_window_seconds: int = field(
        default=1_800,
        metadata=_spec(_range(5, 604_800), "a client is active if it heartbeated this recently"),
    )
    heartbeat_seconds: int = field(
        default=60,
        metadata=_spec(_range(1, 86_400), "how often an edge client heartbeats"),
    )
    poll_seconds: float = field(
        default=10.0,
        metadata=_spec(_range(0.05, 3_600), "how often an idle edge client polls for a round"),
    )
    local_epochs: int = field(
        default=2,
        metadata=_spec(_range(1, 1_000), "epochs each client trains per round"),
    )
    lr: float = field(
        default=0.05,
        metadata=_spec(_range(1e-7, 10.0), "clients' learning rate"),
    )
    proximal_mu: float = field(
        default=0.0,
        metadata=_spec(
            _range(0.0, 1_000.0),
            "FedProx: clients add mu/2 * ||w - w_base||^2 to their loss; 0 is plain local SGD",
        ),
    )
    batch_size: int = field(
        default=16,
        metadata=_spec(_range(1, 65_536), "clients' minibatch size"),
    )
    update_codec: str = field(
        default="none",
        metadata=_spec(
            (lambda v: v in UPDATE_CODECS, f"one of {', '.join(UPDATE_CODECS)}"),
            "how clients encode their update: the trained tensors (none), or their change "
            "from the base model in float16, int8 with a per-tensor scale, or its top-k "
            "entries (docs/compression.md)",
        ),
    )
    topk_fraction: float = field(
        default=DEFAULT_TOPK_FRACTION,
        metadata=_spec(
            _range(MIN_TOPK_FRACTION, 1.0),
            "'topk' codec: share of each tensor's entries an update keeps (the largest changes)",
        ),
    )
    max_update_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_spec(_range(1_024, 5 * 1024**3), "largest update object accepted"),
    )
    max_num_examples: int = field(
        default=10_000_000,
        metadata=_spec(_range(1, 10**12), "largest num_examples a client may claim"),
    )
    max_weight_ratio: float = field(
        default=3.0,
        metadata=_spec(
            _range(1.0, 1e6),
            "a client's aggregation weight is its num_examples, at most this many times the "
            "round's median num_examples",
        ),
    )
    norm_bound_factor: float = field(
        default=2.0,
        metadata=_spec(
            _range(0.0, 1e6),
            "an update's change from the base model is clipped to this many times the round's "
            "median change; 0 turns the adaptive bound off",
        ),
    )
    max_update_norm: float = field(
        default=0.0,
        metadata=_spec(
            _range(0.0, 1e12),
            "an update's change from the base model is clipped to this L2 norm; 0: no fixed bound",
        ),
    )
    seed: int = field(
        default=0,
        metadata=_spec(_range(0, 2**31 - 1), "seed for the initial model and client selection"),
    )

    def __post_init__(self) -> None:
        if isinstance(self.aggregation_params, Mapping):  # cdk.json may give an object
            object.__setattr__(self, "aggregation_params", dict(self.aggregation_params))
            object.__setattr__(
                self, "aggregation_params", rule_params.canonical(self.aggregation_params)
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _field_type(f)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(
                    f"config key {f.name!r}: {value!r} is not a {expected.__name__}; "
                    f"allowed: {f.metadata['allowed']}"
                )
            if not f.metadata["check"](value):
                raise ConfigError(
                    f"config key {f.name!r}: {value!r} is not allowed; "
                    f"allowed: {f.metadata['allowed']}"
                )
        try:
            rule_params.check(self.aggregation, rule_params.parse(self.aggregation_params))
        except rule_params.ParamsError as e:
            raise ConfigError(f"config key 'aggregation_params': {e}") from e
        if self.round_soft_deadline_seconds > self.round_deadline_seconds:
            raise ConfigError(
                f"config key 'round_soft_deadline_seconds': {self.round_soft_deadline_seconds} "
                f"is after round_deadline_seconds={self.round_deadline_seconds}; "
                "allowed: a number no larger than round_deadline_seconds"
            )

    # --- sources -------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "config") -> FederationConfig:
        """Build from a mapping (cdk.json context, JSON file); unknown keys are errors."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: unknown config key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return cls(**dict(values))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FederationConfig:
        """Build from ``SFL_*`` environment variables (how the Lambdas receive it)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        return cls(**values)

    # --- sinks ---------------------------------------------------------------------------

    def to_env(self) -> dict[str, str]:
        """The ``SFL_*`` environment variables that ``from_env`` reads back."""
        return {
            ENV_PREFIX + f.name.upper(): str(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> FederationConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(
        self, values: Mapping[str, str], *, source: str = "--set"
    ) -> FederationConfig:
        """This config with some keys given as text (``KEY=VALUE`` on a command line)."""
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: unknown config key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return self.replace(**{k: _parse(known[k], v) for k, v in values.items()})


def _field_type(f: dataclasses.Field[Any]) -> type:
    return {"str": str, "int": int, "float": float}[str(f.type)]


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _field_type(f)
    try:
        return kind(raw)
    except ValueError as e:
        raise ConfigError(
            f"config key {f.name!r} (env {ENV_PREFIX + f.name.upper()}): {raw!r} is not a "
            f"{kind.__name__}; allowed: {f.metadata['allowed']}"
        ) from e


def describe() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) for every key, for docs and ``sfl config``."""
    return [
        (f.name, repr(f.default), f.metadata["allowed"], f.metadata["doc"])
        for f in dataclasses.fields(FederationConfig)
    ]
