"""The stack's own knobs, read from ``cdk.json`` context with typed defaults and validation.

Federation knobs (rounds, strategies, training) live in :mod:`sfl.core.config` under the context
key ``sfl``; this module holds only what shapes the AWS resources, under ``sfl_infra``. A bad
value fails ``cdk synth`` with the key, the value and what is allowed, like ``sfl.core.config``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sfl.build.recipes import CONFIGURATION_KEYS
from sfl.core import lambda_shapes
from sfl.core.config import ConfigError, FederationConfig
from sfl.core.plugins import IMPORT_PATH

CONTEXT_KEY = "sfl_infra"
FEDERATION_CONTEXT_KEY = "sfl"

# Both Lambdas run this Python; the averager's Dockerfile receives it as a build argument.
LAMBDA_PYTHON_VERSION = "3.14"

# CloudWatch Logs accepts only these retention periods.
LOG_RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731,
    1096, 1827, 2192, 2557, 2922, 3288, 3653,
)  # fmt: skip

# Stack names: a letter, then letters, digits and '-'; kept short so the names CloudFormation
# derives from it (bucket names are capped at 63 characters) stay valid.
_STACK_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,31}$")
# An e-mail address for alarm notifications: one '@', no spaces, a dot in the domain.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# Greengrass component names: dotted identifiers, as in 'com.example.HelloWorld'.
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _range(lo: int, hi: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: lo <= v <= hi, f"an integer from {lo} to {hi}")


def _spec(check: tuple[Callable[[Any], bool], str], doc: str) -> dict[str, Any]:
    return {"check": check[0], "allowed": check[1], "doc": doc}


_ANY_BOOL = (lambda v: True, "true or false")
# What a deployment may set on devices: their own settings, never the stack's.
_DEVICE_KEYS = frozenset(k.key for k in CONFIGURATION_KEYS)


@dataclass(frozen=True)
class InfraConfig:
    """How the stack is shaped. Field metadata holds each key's check, allowed values, meaning."""

    stack_prefix: str = field(
        default="Sfl",
        metadata=_spec(
            (
                lambda v: bool(_STACK_PREFIX.match(v)),
                "a letter, then up to 31 letters, digits, '-'",
            ),
            "the stack is named '<stack_prefix>-Federation'; change it to deploy a second copy",
        ),
    )
    schedule_minutes: int = field(
        default=5,
        metadata=_spec(_range(1, 1440), "minutes between schedule ticks (initiator + averager)"),
    )
    schedule_enabled: bool = field(
        default=True,
        metadata=_spec(_ANY_BOOL, "whether the schedule rule is enabled after deploy"),
    )
    initiator_memory_mb: int = field(
        default=lambda_shapes.INITIATOR.memory_mb,
        metadata=_spec(_range(128, 10_240), "initiator Lambda memory (MB)"),
    )
    initiator_timeout_seconds: int = field(
        default=60,
        metadata=_spec(_range(3, 900), "initiator Lambda timeout (seconds)"),
    )
    initiator_reserved_concurrency: int = field(
        default=0,
        metadata=_spec(_range(0, 1_000), "initiator reserved concurrency; 0 = do not reserve"),
    )
    averager_memory_mb: int = field(
        default=lambda_shapes.AVERAGER.memory_mb,
        metadata=_spec(_range(512, 10_240), "averager Lambda memory (MB); torch needs >= 512"),
    )
    averager_timeout_seconds: int = field(
        default=300,
        metadata=_spec(
            _range(10, 900),
            "averager Lambda timeout (seconds); at most the federation's aggregation lease",
        ),
    )
    averager_reserved_concurrency: int = field(
        default=0,
        metadata=_spec(_range(0, 1_000), "averager reserved concurrency; 0 = do not reserve"),
    )
    log_retention_days: int = field(
        default=30,
        metadata=_spec(
            (
                lambda v: v in LOG_RETENTION_DAYS,
                f"one of {', '.join(map(str, LOG_RETENTION_DAYS))}",
            ),
            "days the Lambdas' CloudWatch logs and the buckets' access logs are kept",
        ),
    )
    update_expiry_days: int = field(
        default=30,
        metadata=_spec(_range(1, 3_650), "days after which client updates are deleted"),
    )
    retain_data: bool = field(
        default=False,
        metadata=_spec(
            _ANY_BOOL, "keep buckets and tables on 'cdk destroy' (default: delete everything)"
        ),
    )
    alarm_email: str = field(
        default="",
        metadata=_spec(
            (lambda v: v == "" or bool(_EMAIL.match(v)), "'' or an e-mail address"),
            "subscribe this address to the alarm topic (it must confirm); '' subscribes no one",
        ),
    )
    device_configuration: dict[str, str] = field(
        default_factory=dict,
        metadata=_spec(
            (
                lambda v: all(k in _DEVICE_KEYS and isinstance(x, str) for k, x in v.items()),
                "a JSON object of device-owned component settings, string values, keys from: "
                + ", ".join(sorted(_DEVICE_KEYS)),
            ),
            "merged into every device's component configuration by the stack's deployment "
            '(e.g. {"dataDir": "/mnt/fl-data"})',
        ),
    )
    component_name: str = field(
        default="",
        metadata=_spec(
            (lambda v: v == "" or bool(_COMPONENT_NAME.match(v)), "'' or a name like 'com.x.Y'"),
            "Greengrass component name; '' means '<stack_prefix>.EdgeClient'",
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"str": str, "int": int, "bool": bool, "dict[str, str]": dict}[str(f.type)]
            # bool is an int subclass: a flag must be a real bool, a number never a bool.
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(
                    f"config key {CONTEXT_KEY}.{f.name}: {value!r} is not a {expected.__name__}; "
                    f"allowed: {f.metadata['allowed']}"
                )
            if not f.metadata["check"](value):
                raise ConfigError(
                    f"config key {CONTEXT_KEY}.{f.name}: {value!r} is not allowed; "
                    f"allowed: {f.metadata['allowed']}"
                )

    @property
    def stack_name(self) -> str:
        return f"{self.stack_prefix}-Federation"

    @property
    def resolved_component_name(self) -> str:
        return self.component_name or f"{self.stack_prefix}.EdgeClient"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = CONTEXT_KEY) -> InfraConfig:
        """Build from a mapping (the ``sfl_infra`` context); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown config key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return cls(**dict(values))


@dataclass(frozen=True)
class StackConfig:
    """Everything the stack is built from: the federation's knobs and the stack's own."""

    federation: FederationConfig
    infra: InfraConfig

    def __post_init__(self) -> None:
        _refuse_import_paths(self.federation)
        lease = self.federation.aggregation_lease_seconds
        if self.infra.averager_timeout_seconds > lease:
            # A lease shorter than the function's run time lets a second aggregation start
            # while the first may still be writing.
            raise ConfigError(
                f"config key {CONTEXT_KEY}.averager_timeout_seconds: "
                f"{self.infra.averager_timeout_seconds!r} is not allowed; allowed: at most "
                f"{FEDERATION_CONTEXT_KEY}.aggregation_lease_seconds ({lease})"
            )

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> StackConfig:
        """Read both context keys through ``get`` (e.g. ``app.node.try_get_context``)."""
        return cls(
            federation=FederationConfig.from_mapping(
                _mapping(get(FEDERATION_CONTEXT_KEY), FEDERATION_CONTEXT_KEY),
                source=f"cdk.json context {FEDERATION_CONTEXT_KEY!r}",
            ),
            infra=InfraConfig.from_mapping(
                _mapping(get(CONTEXT_KEY), CONTEXT_KEY),
                source=f"cdk.json context {CONTEXT_KEY!r}",
            ),
        )


def _refuse_import_paths(federation: FederationConfig) -> None:
    """A plug-in named by import path runs in local mode only: the initiator's zip, the
    averager's image and the devices' artifact carry the sfl package and nothing else, so a
    deployed stack would fail on every invocation. Refuse it before anything is deployed."""
    for f in dataclasses.fields(federation):
        value = getattr(federation, f.name)
        if isinstance(value, str) and IMPORT_PATH.match(value):
            raise ConfigError(
                f"config key {FEDERATION_CONTEXT_KEY}.{f.name}: {value!r} is an import path, "
                "which a deployed stack cannot run: the initiator zip, the averager image and "
                "the device artifact package only the sfl package. Deploy a built-in name "
                "(`sfl config` lists them); a custom plug-in runs in local mode "
                "(`sfl simulate`) only"
            )


def _mapping(raw: Any, key: str) -> Mapping[str, Any]:
    """Context is a JSON object in cdk.json, or a JSON string when given as ``-c key=...``."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"context {key!r}: {raw!r} is not a JSON object") from e
    if not isinstance(raw, Mapping):
        raise ConfigError(f"context {key!r}: {raw!r} is not allowed; allowed: a JSON object")
    return raw


def describe() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) for every infra key, for docs."""
    defaults = InfraConfig()
    return [
        (f.name, repr(getattr(defaults, f.name)), f.metadata["allowed"], f.metadata["doc"])
        for f in dataclasses.fields(InfraConfig)
    ]
