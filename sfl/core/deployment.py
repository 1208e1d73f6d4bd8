"""What a deployment is built from: the stack's own settings (``cdk.json`` context
``sfl_infra``) beside the federation's (context ``sfl``), read and checked once.

Federation knobs (rounds, strategies, training) live in :mod:`sfl.core.config`; here only
what shapes the AWS resources. Torch-free data: the CDK app (``infra/``) builds the stack
from it, ``sfl cost`` prices it and ``sfl recipes`` names the component from it. A bad value
fails with the key, the value and what is allowed, in the wording of :mod:`sfl.core.settings`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sfl.core import config, lambda_shapes, sizing
from sfl.core.config import ConfigError, FederationConfig
from sfl.core.device_settings import CONFIGURATION_KEYS
from sfl.core.settings import ANY_BOOL, Allowed, OneOf, Range, Settings, setting

CONTEXT_KEY = "sfl_infra"
FEDERATION_CONTEXT_KEY = config.CONTEXT_KEY

# CloudWatch Logs accepts only these retention periods.
LOG_RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731,
    1096, 1827, 2192, 2557, 2922, 3288, 3653,
)  # fmt: skip

# Lambda keeps this much of an account's concurrency unreserved, for the functions that reserve
# none: a reservation that would leave less fails the deploy ("... decreases account's
# UnreservedConcurrentExecution below its minimum value of [100]"). An account of 10 (a new
# one) can reserve nothing.
UNRESERVED_CONCURRENCY = 100

# Stack names: a letter, then letters, digits and '-'; kept short so the names CloudFormation
# derives from it (bucket names are capped at 63 characters) stay valid.
_STACK_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,31}$")
# An e-mail address for alarm notifications: one '@', no spaces, a dot in the domain.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# Greengrass component names: dotted identifiers, as in 'com.example.HelloWorld'.
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# What a deployment may set on devices: their own settings, never the stack's.
_DEVICE_KEYS = frozenset(k.key for k in CONFIGURATION_KEYS)


@dataclass(frozen=True)
class InfraConfig(Settings):
    """How the stack is shaped (context ``sfl_infra``)."""

    namespace: ClassVar[str] = CONTEXT_KEY

    stack_prefix: str = setting(
        "Sfl",
        allowed=Allowed(
            lambda v: bool(_STACK_PREFIX.match(v)), "a letter, then up to 31 letters, digits, '-'"
        ),
        doc="the stack is named '<stack_prefix>-Federation'; change it to deploy a second copy",
    )
    schedule_minutes: int = setting(
        5,
        allowed=Range(1, 1440),
        doc="minutes between schedule ticks (initiator + averager)",
    )
    schedule_enabled: bool = setting(
        True, allowed=ANY_BOOL, doc="whether the schedule rule is enabled after deploy"
    )
    initiator_memory_mb: int = setting(
        lambda_shapes.INITIATOR.memory_mb,
        allowed=Range(128, 10_240),
        doc="initiator Lambda memory (MB)",
    )
    initiator_timeout_seconds: int = setting(
        60, allowed=Range(3, 900), doc="initiator Lambda timeout (seconds)"
    )
    initiator_reserved_concurrency: int = setting(
        0, allowed=Range(0, 1_000), doc="initiator reserved concurrency; 0 = do not reserve"
    )
    averager_memory_mb: int = setting(
        0,
        allowed=Allowed(lambda v: v == 0 or 512 <= v <= 10_240, "0, or 512 to 10240"),
        doc="averager Lambda memory (MB); 0: derived from the model's size and the rule "
        f"(sfl.core.sizing, at least {lambda_shapes.AVERAGER.memory_mb}); torch needs >= 512",
    )
    averager_timeout_seconds: int = setting(
        0,
        allowed=Allowed(lambda v: v == 0 or 10 <= v <= 900, "0, or 10 to 900"),
        doc="averager Lambda timeout (seconds); 0: derived (at least 300); at most the "
        "federation's aggregation lease",
    )
    averager_ephemeral_mib: int = setting(
        0,
        allowed=Allowed(lambda v: v == 0 or 512 <= v <= 10_240, "0, or 512 to 10240"),
        doc="averager /tmp (MiB), where median, trimmed_mean and krum spool a round's "
        "updates; 0: derived from the model's size and the updates per round",
    )
    model_bytes: int = setting(
        0,
        allowed=Range(0, 10 * 1024**3),
        doc="the task's model size in bytes, as 'sfl task check' prints it, to size the "
        "averager; 0: known for built-in tasks",
    )
    max_round_updates: int = setting(
        0,
        allowed=Range(0, 1_000_000),
        doc="the most updates one round aggregates, to size the averager; 0: "
        f"sfl.clients_per_round, or {sizing.DEFAULT_ROUND_UPDATES} when that is 0",
    )
    averager_reserved_concurrency: int = setting(
        0,
        allowed=Range(0, 1_000),
        doc="averager reserved concurrency, the cap a flood of uploads meets; 0 = do not "
        "reserve (new accounts have only 10 in all); 10-20 on an account of 1,000",
    )
    account_concurrency: int = setting(
        1_000,
        allowed=Range(1, 1_000_000),
        doc="the account's Lambda concurrent executions in the stack's region (aws lambda "
        "get-account-settings: AccountLimit.ConcurrentExecutions; 10 on a new account); "
        f"synthesis refuses reservations that would leave less than {UNRESERVED_CONCURRENCY} "
        "of it unreserved",
    )
    log_retention_days: int = setting(
        30,
        allowed=OneOf(LOG_RETENTION_DAYS),
        doc="days the Lambdas' CloudWatch logs and the buckets' access logs are kept",
    )
    update_expiry_days: int = setting(
        30,
        allowed=Range(1, 3_650),
        doc="days after which an update still in the bucket expires (the averager deletes each "
        "once its round or buffer is finished; this is the backstop)",
    )
    retain_data: bool = setting(
        False,
        allowed=ANY_BOOL,
        doc="keep buckets and tables on 'cdk destroy' (default: delete everything)",
    )
    alarm_email: str = setting(
        "",
        allowed=Allowed(lambda v: v == "" or bool(_EMAIL.match(v)), "'' or an e-mail address"),
        doc="subscribe this address to the alarm topic (it must confirm); '' subscribes no one",
    )
    device_configuration: dict[str, str] = setting(
        default_factory=dict,
        allowed=Allowed(
            lambda v: all(k in _DEVICE_KEYS and isinstance(x, str) for k, x in v.items()),
            "a JSON object of device-owned component settings, string values, keys from: "
            + ", ".join(sorted(_DEVICE_KEYS)),
        ),
        doc="merged into every device's component configuration by the stack's deployment "
        '(e.g. {"dataDir": "/mnt/fl-data"}); the recipe\'s other keys are reset to their defaults',
    )
    component_name: str = setting(
        "",
        allowed=Allowed(
            lambda v: v == "" or bool(_COMPONENT_NAME.match(v)), "'' or a name like 'com.x.Y'"
        ),
        doc="Greengrass component name; '' means '<stack_prefix>.EdgeClient'",
    )

    @property
    def stack_name(self) -> str:
        return f"{self.stack_prefix}-Federation"

    @property
    def resolved_component_name(self) -> str:
        return self.component_name or f"{self.stack_prefix}.EdgeClient"


@dataclass(frozen=True)
class StackConfig:
    """Everything the stack is built from: the federation's knobs and the stack's own, with
    the checks that need both."""

    federation: FederationConfig
    infra: InfraConfig
    #: The averager's (and shard function's) memory, /tmp and timeout, derived when built.
    averager: sizing.AveragerSize = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "averager", size_averager(self.federation, self.infra))
        check_reservations(self.infra)
        lease = self.federation.aggregation_lease_seconds
        if self.infra.averager_timeout_seconds > lease:
            # A lease shorter than the function's run time lets a second aggregation start
            # while the first may still be writing.
            raise ConfigError(
                f"config key {InfraConfig.label('averager_timeout_seconds')}: "
                f"{self.infra.averager_timeout_seconds!r} is not allowed; allowed: at most "
                f"{FEDERATION_CONTEXT_KEY}.aggregation_lease_seconds ({lease})"
            )

    @classmethod
    def from_context(cls, get: Callable[[str], Any], *, source: str = "cdk.json") -> StackConfig:
        """Read both context keys through ``get`` (``app.node.try_get_context``, or a
        ``cdk.json``'s context object's ``get``)."""
        return cls(
            federation=FederationConfig.from_mapping(
                context_mapping(get(FEDERATION_CONTEXT_KEY), FEDERATION_CONTEXT_KEY),
                source=f"{source} context {FEDERATION_CONTEXT_KEY!r}",
            ),
            infra=InfraConfig.from_mapping(
                context_mapping(get(CONTEXT_KEY), CONTEXT_KEY),
                source=f"{source} context {CONTEXT_KEY!r}",
            ),
        )

    @classmethod
    def from_cdk_json(cls, path: Path) -> StackConfig:
        """Read a ``cdk.json`` file as ``cdk synth`` reads its context."""
        context = json.loads(path.read_text(encoding="utf-8")).get("context", {})
        if not isinstance(context, Mapping):
            raise ConfigError(f"{path}: 'context' is not allowed; allowed: a JSON object")
        return cls.from_context(context.get, source=str(path))


def check_reservations(infra: InfraConfig) -> None:
    """Refuse reserved concurrency the account cannot give: Lambda keeps
    :data:`UNRESERVED_CONCURRENCY` of ``account_concurrency`` unreserved (the shard function
    reserves none). Other functions' reservations in the account are not known here."""
    reserved = infra.initiator_reserved_concurrency + infra.averager_reserved_concurrency
    room = max(0, infra.account_concurrency - UNRESERVED_CONCURRENCY)
    if reserved > room:
        keys = " + ".join(
            InfraConfig.label(k)
            for k in ("initiator_reserved_concurrency", "averager_reserved_concurrency")
        )
        raise ConfigError(
            f"config keys {keys}: {reserved} is not allowed; allowed: at most {room} "
            f"({InfraConfig.label('account_concurrency')} = {infra.account_concurrency}, less "
            f"the {UNRESERVED_CONCURRENCY} Lambda keeps unreserved); set them to 0 to draw "
            "from the unreserved pool, or ask AWS to raise the account's concurrency"
        )


def size_averager(federation: FederationConfig, infra: InfraConfig) -> sizing.AveragerSize:
    """The averager's size for this task's model and rule (``sfl.core.sizing``), explicit
    settings checked against the need; a ``ConfigError`` with the numbers if it cannot fit."""
    model_bytes = infra.model_bytes or sizing.BUILTIN_MODEL_BYTES.get(federation.task, 0)
    rule = federation.aggregation
    try:
        if not model_bytes:
            if sizing.RuleNeeds.of(rule).reads_all_at_once:
                key = InfraConfig.label("model_bytes")
                raise sizing.SizingError(
                    f"rule {rule!r} spools every update to the averager's ephemeral storage, "
                    f"which is sized from the model: give {key} the size that "
                    f"'sfl task check --task {federation.task}' prints"
                )
            # A streaming rule's memory does not grow with the updates: the stack's defaults.
            need = sizing.AveragerNeed(
                memory_mb=lambda_shapes.AVERAGER.memory_mb,
                ephemeral_mib=sizing.MIN_EPHEMERAL_MIB,
                timeout_seconds=min(
                    sizing.MIN_TIMEOUT_SECONDS, federation.aggregation_lease_seconds
                ),
                basis=f"task {federation.task!r} of unknown size (sfl_infra.model_bytes = 0)",
            )
        else:
            need = sizing.averager_need(
                model_bytes=model_bytes,
                updates=infra.max_round_updates
                or federation.clients_per_round
                or sizing.DEFAULT_ROUND_UPDATES,
                rule=rule,
                in_flight=federation.aggregation_in_flight,
                shard_above=federation.aggregation_shard_above,
                shard_size=federation.aggregation_shard_size,
            )
        return sizing.size_averager(
            need,
            memory_mb=infra.averager_memory_mb,
            ephemeral_mib=infra.averager_ephemeral_mib,
            timeout_seconds=infra.averager_timeout_seconds,
            lease_seconds=federation.aggregation_lease_seconds,
            label=CONTEXT_KEY,
        )
    except sizing.SizingError as e:
        raise ConfigError(str(e)) from e


def context_mapping(raw: Any, key: str) -> Mapping[str, Any]:
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
    """(key, default, allowed, meaning) for every ``sfl_infra`` key, for docs."""
    return InfraConfig.describe()
