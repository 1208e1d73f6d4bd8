"""The operator's control of a running federation: runtime configuration, pause, rollback,
promotion. Read by the initiator each round; written by ``sfl`` commands.

Records live in the rounds table under the partition ``<experiment>#control`` (no experiment
name can contain ``#``): sort key 0 is the current control item, sort key ``n >= 1`` is
configuration version ``n``, written once. A configuration version holds only the keys set
at runtime (overrides); the deployed configuration (``cdk.json``) supplies the rest, so a
redeploy changes every key nobody has set at runtime, and a runtime change wins over a
redeploy until ``sfl config unset`` hands the key back to ``cdk.json``. Every write is
conditional: two operators changing the configuration at once cannot lose an update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sfl.core.config import DEPLOY_TIME_KEYS, ConfigError, FederationConfig
from sfl.state.conditional import conditional
from sfl.state.dynamo import from_item, serialize

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

    from sfl.state.rounds import Round

logger = logging.getLogger(__name__)

CONTROL_SUFFIX = "#control"
STATE_SORT_KEY = 0


class ControlConflict(RuntimeError):
    """Someone else changed the control record between our read and our write."""


def control_partition(experiment: str) -> str:
    return experiment + CONTROL_SUFFIX


@dataclass(frozen=True)
class ConfigVersion:
    """One runtime configuration: the keys set at runtime, and when and what changed."""

    version: int
    overrides: Mapping[str, Any]
    set_at: float
    changed: Mapping[str, Any] = field(default_factory=dict)  # key -> new value (None: unset)
    note: str = ""


@dataclass(frozen=True)
class ControlState:
    """The current control item of an experiment (defaults when none was written)."""

    config_version: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    paused: bool = False
    paused_at: float | None = None
    pause_reason: str = ""
    rollback_to: int | None = None
    rollback_requested_at: float | None = None
    promoted_version: int | None = None
    promoted_at: float | None = None

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> ControlState:
        d = from_item(item)
        return cls(
            config_version=int(d.get("config_version", 0)),
            overrides=dict(d.get("overrides", {})),
            paused=bool(d.get("paused", False)),
            paused_at=d.get("paused_at"),
            pause_reason=str(d.get("pause_reason", "")),
            rollback_to=d.get("rollback_to"),
            rollback_requested_at=d.get("rollback_requested_at"),
            promoted_version=d.get("promoted_version"),
            promoted_at=d.get("promoted_at"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_version": self.config_version,
            "overrides": dict(self.overrides),
            "paused": self.paused,
            "paused_at": self.paused_at,
            "pause_reason": self.pause_reason,
            "rollback_to": self.rollback_to,
            "rollback_requested_at": self.rollback_requested_at,
            "promoted_version": self.promoted_version,
            "promoted_at": self.promoted_at,
        }


def effective_config(deployed: FederationConfig, overrides: Mapping[str, Any]) -> FederationConfig:
    """The deployed configuration with the runtime overrides applied and validated."""
    fixed = sorted(set(overrides) & DEPLOY_TIME_KEYS)
    if fixed:
        raise ConfigError(
            f"config key(s) {', '.join(map(repr, fixed))} are fixed at deploy time "
            "(cdk.json context 'sfl', then a redeploy)"
        )
    if not overrides:
        return deployed
    FederationConfig.refuse_unknown(overrides, source="runtime config")
    return deployed.replace(**dict(overrides))


class ControlStore:
    """The control records of the federation's experiments in the rounds table."""

    def __init__(self, dynamodb: DynamoDBClient, table_name: str) -> None:
        self._ddb = dynamodb
        self._table = table_name

    def _key(self, experiment: str, sort_key: int) -> dict[str, Any]:
        return {"experiment": {"S": control_partition(experiment)}, "round": {"N": str(sort_key)}}

    # --- reads ---------------------------------------------------------------------------

    def state(self, experiment: str) -> ControlState:
        item = self._ddb.get_item(
            TableName=self._table, Key=self._key(experiment, STATE_SORT_KEY), ConsistentRead=True
        ).get("Item")
        return ControlState.from_item(item) if item else ControlState()

    def config_history(self, experiment: str) -> list[ConfigVersion]:
        versions: list[ConfigVersion] = []
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "experiment = :e AND #r > :zero",
            "ExpressionAttributeNames": {"#r": "round"},
            "ExpressionAttributeValues": {
                ":e": {"S": control_partition(experiment)},
                ":zero": {"N": str(STATE_SORT_KEY)},
            },
            "ConsistentRead": True,
        }
        while True:
            response = self._ddb.query(**kwargs)
            for item in response.get("Items", []):
                d = from_item(item)
                versions.append(
                    ConfigVersion(
                        version=int(d["round"]),
                        overrides=dict(d.get("overrides", {})),
                        set_at=float(d.get("set_at", 0.0)),
                        changed=dict(d.get("changed", {})),
                        note=str(d.get("note", "")),
                    )
                )
            if "LastEvaluatedKey" not in response:
                return versions
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    # --- configuration -------------------------------------------------------------------

    def set_config(
        self,
        deployed: FederationConfig,
        changes: Mapping[str, str],
        *,
        unset: Iterable[str] = (),
        now: float,
        note: str = "",
    ) -> tuple[ConfigVersion, FederationConfig]:
        """Write the next configuration version: ``changes`` (text values, as on a command
        line) and ``unset`` keys applied to the current overrides, validated as a whole
        against the deployed configuration. Raises ``ConfigError`` for a bad value."""
        experiment = deployed.experiment
        current = self.state(experiment)
        unset = list(unset)
        fixed = sorted((set(changes) | set(unset)) & DEPLOY_TIME_KEYS)
        if fixed:
            raise ConfigError(
                f"config key(s) {', '.join(map(repr, fixed))} are fixed at deploy time "
                "(cdk.json context 'sfl', then a redeploy)"
            )
        FederationConfig.refuse_unknown(unset, source="unset")
        # The new values as their types; effective_config checks them with the rest, once.
        parsed = FederationConfig.parse_text(changes, source="sfl config set")
        overrides = {k: v for k, v in current.overrides.items() if k not in unset}
        overrides.update(parsed)
        config = effective_config(deployed, overrides)
        version = current.config_version + 1
        changed: dict[str, Any] = dict(parsed)
        changed.update({k: None for k in unset})
        record = ConfigVersion(version, overrides, now, changed, note)
        self._transact(
            experiment,
            expected_version=current.config_version,
            update="SET config_version = :v, overrides = :o, updated_at = :now",
            values={":v": serialize(version), ":o": serialize(overrides), ":now": serialize(now)},
            version_item={
                "experiment": {"S": control_partition(experiment)},
                "round": {"N": str(version)},
                "overrides": serialize(overrides),
                "changed": serialize(changed),
                "set_at": serialize(now),
                "note": {"S": note},
            },
        )
        return record, config

    def _transact(
        self,
        experiment: str,
        *,
        expected_version: int,
        update: str,
        values: Mapping[str, Any],
        version_item: Mapping[str, Any],
    ) -> None:
        condition = (
            "attribute_not_exists(config_version) OR config_version = :expected"
            if expected_version == 0
            else "config_version = :expected"
        )
        write = conditional(
            self._ddb.transact_write_items,
            TransactItems=[
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": self._key(experiment, STATE_SORT_KEY),
                        "UpdateExpression": update,
                        "ConditionExpression": condition,
                        "ExpressionAttributeValues": {
                            **values,
                            ":expected": serialize(expected_version),
                        },
                    }
                },
                {
                    "Put": {
                        "TableName": self._table,
                        "Item": dict(version_item),
                        "ConditionExpression": "attribute_not_exists(#r)",
                        "ExpressionAttributeNames": {"#r": "round"},
                    }
                },
            ],
        )
        if not write.written:
            raise ControlConflict(
                "the runtime configuration changed while this change was being written; "
                "look at 'sfl config show' and try again"
            ) from write.refusal

    # --- pause, rollback, promotion ------------------------------------------------------

    def _set(self, experiment: str, expression: str, values: Mapping[str, Any]) -> None:
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "Key": self._key(experiment, STATE_SORT_KEY),
            "UpdateExpression": expression,
        }
        if values:
            kwargs["ExpressionAttributeValues"] = dict(values)
        self._ddb.update_item(**kwargs)

    def pause(self, experiment: str, *, now: float, reason: str = "") -> None:
        """Pause; pausing again keeps when the pause began, and its reason unless a new one
        is given."""
        why = ":why" if reason else "if_not_exists(pause_reason, :why)"
        self._set(
            experiment,
            f"SET paused = :t, paused_at = if_not_exists(paused_at, :now), pause_reason = {why}",
            {":t": {"BOOL": True}, ":now": serialize(now), ":why": {"S": reason}},
        )

    def resume(self, experiment: str) -> None:
        self._set(
            experiment, "SET paused = :f REMOVE paused_at, pause_reason", {":f": {"BOOL": False}}
        )

    def request_rollback(self, experiment: str, version: int, *, now: float) -> None:
        self._set(
            experiment,
            "SET rollback_to = :v, rollback_requested_at = :now",
            {":v": serialize(version), ":now": serialize(now)},
        )

    def cancel_rollback(self, experiment: str) -> bool:
        """Drop a pending rollback; False if none was pending (never asked, or already
        carried out by the initiator)."""
        return conditional(
            self._ddb.update_item,
            TableName=self._table,
            Key=self._key(experiment, STATE_SORT_KEY),
            UpdateExpression="REMOVE rollback_to, rollback_requested_at",
            ConditionExpression="attribute_exists(rollback_to)",
        ).written

    def rollback_done(self, experiment: str, version: int) -> bool:
        """Clear a rollback request the initiator carried out, unless a newer one replaced it."""
        return conditional(
            self._ddb.update_item,
            TableName=self._table,
            Key=self._key(experiment, STATE_SORT_KEY),
            UpdateExpression="REMOVE rollback_to, rollback_requested_at",
            ConditionExpression="rollback_to = :v",
            ExpressionAttributeValues={":v": serialize(version)},
        ).written

    def promoted(self, experiment: str, version: int, *, now: float) -> None:
        self._set(
            experiment,
            "SET promoted_version = :v, promoted_at = :now",
            {":v": serialize(version), ":now": serialize(now)},
        )


# --- the averager's side: the configuration a round recorded ------------------------------

_ROUND_CONFIGS: dict[tuple[tuple[str, Any], ...], FederationConfig] = {}


def round_config(round_: Round, deployed: FederationConfig) -> FederationConfig:
    """The configuration a round recorded when it started (``deployed`` for rounds started
    before runtime configuration existed, or whose record no longer validates)."""
    if not round_.config:
        return deployed
    cache_key = tuple(sorted((k, repr(v)) for k, v in round_.config.items()))
    config = _ROUND_CONFIGS.get(cache_key)
    if config is None:
        try:
            config = FederationConfig.from_mapping(round_.config, source="round record")
        except (ConfigError, TypeError) as e:
            logger.warning(
                "round's recorded config is not valid here; using the deployed one",
                extra={"round": round_.round, "error": str(e)},
            )
            return deployed
        if len(_ROUND_CONFIGS) > 64:
            _ROUND_CONFIGS.clear()
        _ROUND_CONFIGS[cache_key] = config
    return config


# --- the initiator's side: what the operator asked of the next round ----------------------


@dataclass(frozen=True)
class RoundPlan:
    """What the control record says about starting the next round."""

    config: FederationConfig
    config_version: int = 0
    refusal: str = ""  # why no round may start now ("" if one may)
    rollback_to: int | None = None


def plan_round(store: ControlStore, deployed: FederationConfig) -> RoundPlan:
    """Paused, the runtime configuration (refused if it no longer validates against the
    deployed one, e.g. after a redeploy removed a plug-in), and a pending rollback."""
    state = store.state(deployed.experiment)
    if state.paused:
        return RoundPlan(deployed, state.config_version, "paused by the operator (sfl resume)")
    try:
        config = effective_config(deployed, state.overrides)
    except ConfigError as e:
        return RoundPlan(
            deployed,
            state.config_version,
            f"runtime config version {state.config_version} is not valid with the deployed "
            f"config: {e}; change it with 'sfl config set' or 'sfl config unset'",
        )
    return RoundPlan(config, state.config_version, rollback_to=state.rollback_to)
