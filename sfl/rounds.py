"""Round records and their transitions: OPEN -> AGGREGATING -> CLOSED, or -> ABANDONED.

Every transition is one DynamoDB conditional write, so concurrent initiators and
averagers agree without locks: at most one round is open, each client answers a round
once, and exactly one aggregation wins (with a lease, so a crashed one is retried).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sfl.aws import error_code
from sfl.dynamo import from_item, serialize, to_item

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

logger = logging.getLogger(__name__)

# Rejections that are not a selected client's answer (unselected senders, late or repeated
# uploads) are kept on the round record once per client and reason, with a count of how many
# objects it was, for up to this many (client, reason) pairs; beyond that only the per-reason
# counts grow. A device flooding uploads fills one entry, not the record.
MAX_OTHER_REJECTIONS = 100


def rejection_key(rejection: Mapping[str, Any]) -> str:
    return f"{rejection.get('client_id')}|{rejection.get('reason')}"


class RoundState(enum.StrEnum):
    OPEN = "OPEN"
    AGGREGATING = "AGGREGATING"
    CLOSED = "CLOSED"
    ABANDONED = "ABANDONED"

    @property
    def finished(self) -> bool:
        return self in (RoundState.CLOSED, RoundState.ABANDONED)


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Answer:
    """A selected client's answer to a round: an accepted update or the reason it was not."""

    outcome: Outcome
    key: str
    etag: str = ""
    size: int = 0
    reason: str = ""
    num_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    received_at: float = 0.0
    delta_norm: float = 0.0  # L2 norm of the update's change from the base model

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "key": self.key,
            "etag": self.etag,
            "size": self.size,
            "reason": self.reason,
            "num_examples": self.num_examples,
            "metrics": dict(self.metrics),
            "timings": dict(self.timings),
            "bytes_down": self.bytes_down,
            "received_at": self.received_at,
            "delta_norm": self.delta_norm,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Answer:
        return cls(
            outcome=Outcome(d["outcome"]),
            key=d.get("key", ""),
            etag=d.get("etag", ""),
            size=int(d.get("size", 0)),
            reason=d.get("reason", ""),
            num_examples=int(d.get("num_examples", 0)),
            metrics=dict(d.get("metrics", {})),
            timings=dict(d.get("timings", {})),
            bytes_down=int(d.get("bytes_down", 0)),
            received_at=float(d.get("received_at", 0.0)),
            delta_norm=float(d.get("delta_norm", 0.0)),
        )


@dataclass(frozen=True)
class Round:
    experiment: str
    round: int
    status: RoundState
    base_version: int
    selected: tuple[str, ...]
    created_at: float
    deadline_at: float
    train_config: Mapping[str, Any]
    answers: Mapping[str, Answer] = field(default_factory=dict)
    soft_deadline_at: float = 0.0  # 0: same as deadline_at
    other_rejections: tuple[Mapping[str, Any], ...] = ()
    rejection_counts: Mapping[str, int] = field(default_factory=dict)
    norm_bound_hint: float = 0.0  # the last closed round's norm bound; 0: none yet
    candidates: int = 0
    select_seconds: float = 0.0
    lease_owner: str = ""
    lease_expires_at: float = 0.0
    aggregation_attempts: int = 0
    model_version: int | None = None
    finished_at: float | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    abandon_reason: str = ""
    # The runtime configuration the round runs with (sfl.control): its version (0: as
    # deployed) and every key's value, so the averager judges it by the same settings.
    config_version: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    # The new model's scores on the held-out evaluation set, written after the round closed.
    evaluation: Mapping[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> dict[str, Answer]:
        return {c: a for c, a in sorted(self.answers.items()) if a.outcome is Outcome.ACCEPTED}

    @property
    def rejected(self) -> dict[str, Answer]:
        return {c: a for c, a in sorted(self.answers.items()) if a.outcome is Outcome.REJECTED}

    def to_item(self) -> dict[str, Any]:
        return to_item(
            {
                "experiment": self.experiment,
                "round": self.round,
                "status": self.status.value,
                "base_version": self.base_version,
                "selected": list(self.selected),
                "created_at": self.created_at,
                "deadline_at": self.deadline_at,
                "soft_deadline_at": self.soft_deadline_at or self.deadline_at,
                "train_config": dict(self.train_config),
                "answers": {c: a.to_dict() for c, a in self.answers.items()},
                "other_rejections": {rejection_key(r): dict(r) for r in self.other_rejections},
                "rejection_counts": dict(self.rejection_counts),
                "norm_bound_hint": self.norm_bound_hint,
                "candidates": self.candidates,
                "select_seconds": self.select_seconds,
                "aggregation_attempts": self.aggregation_attempts,
                "config_version": self.config_version,
                "config": dict(self.config) or None,
            }
        )

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Round:
        d = from_item(item)
        return cls(
            experiment=d["experiment"],
            round=int(d["round"]),
            status=RoundState(d["status"]),
            base_version=int(d["base_version"]),
            selected=tuple(d.get("selected", [])),
            created_at=float(d["created_at"]),
            deadline_at=float(d["deadline_at"]),
            soft_deadline_at=float(d.get("soft_deadline_at", d["deadline_at"])),
            train_config=d.get("train_config", {}),
            answers={c: Answer.from_dict(a) for c, a in d.get("answers", {}).items()},
            other_rejections=tuple(
                sorted(d.get("other_rejections", {}).values(), key=lambda r: r.get("at", 0.0))
            ),
            rejection_counts={k: int(v) for k, v in d.get("rejection_counts", {}).items()},
            norm_bound_hint=float(d.get("norm_bound_hint", 0.0)),
            candidates=int(d.get("candidates", 0)),
            select_seconds=float(d.get("select_seconds", 0.0)),
            lease_owner=d.get("lease_owner", ""),
            lease_expires_at=float(d.get("lease_expires_at", 0.0)),
            aggregation_attempts=int(d.get("aggregation_attempts", 0)),
            model_version=d.get("model_version"),
            finished_at=d.get("finished_at"),
            summary=d.get("summary", {}),
            abandon_reason=d.get("abandon_reason", ""),
            config_version=int(d.get("config_version", 0)),
            config=d.get("config", {}),
            evaluation=d.get("evaluation", {}),
        )

    def assignment(self, model_key: str) -> dict[str, Any]:
        """What clients see when they poll: enough to train and answer, nothing more."""
        return {
            "experiment": self.experiment,
            "round": self.round,
            "status": self.status.value,
            "base_version": self.base_version,
            "model_key": model_key,
            "selected": list(self.selected),
            "created_at": self.created_at,
            "deadline_at": self.deadline_at,
            "train_config": dict(self.train_config),
        }


def storable(value: Any) -> Any:
    """A value DynamoDB can hold: non-finite or out-of-range floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) and abs(value) < 1e100 else None
    if isinstance(value, Mapping):
        return {str(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


class RecordResult(enum.StrEnum):
    RECORDED = "recorded"
    ALREADY_ANSWERED = "already_answered"
    NOT_SELECTED = "not_selected"
    NOT_OPEN = "not_open"
    NO_SUCH_ROUND = "no_such_round"


@dataclass(frozen=True)
class RecordOutcome:
    result: RecordResult
    round: Round | None


class RoundStore:
    """Round records in the rounds table; every write is conditional."""

    def __init__(self, dynamodb: DynamoDBClient, table_name: str) -> None:
        self._ddb = dynamodb
        self._table = table_name

    def _key(self, experiment: str, number: int) -> dict[str, Any]:
        return {"experiment": {"S": experiment}, "round": {"N": str(number)}}

    def latest(self, experiment: str) -> Round | None:
        response = self._ddb.query(
            TableName=self._table,
            KeyConditionExpression="experiment = :e",
            ExpressionAttributeValues={":e": {"S": experiment}},
            ScanIndexForward=False,
            Limit=1,
            ConsistentRead=True,
        )
        items = response.get("Items", [])
        return Round.from_item(items[0]) if items else None

    def get(self, experiment: str, number: int) -> Round | None:
        response = self._ddb.get_item(
            TableName=self._table, Key=self._key(experiment, number), ConsistentRead=True
        )
        item = response.get("Item")
        return Round.from_item(item) if item else None

    def history(self, experiment: str) -> list[Round]:
        rounds: list[Round] = []
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "experiment = :e",
            "ExpressionAttributeValues": {":e": {"S": experiment}},
            "ConsistentRead": True,
        }
        while True:
            response = self._ddb.query(**kwargs)
            rounds.extend(Round.from_item(i) for i in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                return rounds
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def create(self, new: Round, previous: Round | None) -> bool:
        """Create round n+1 only if round n is finished and n+1 does not exist yet.

        Returns False when another initiator won the race (or round n is still going).
        """
        put = {
            "TableName": self._table,
            "Item": new.to_item(),
            "ConditionExpression": "attribute_not_exists(#r)",
            "ExpressionAttributeNames": {"#r": "round"},
        }
        try:
            if previous is None:
                if new.round != 1:
                    raise ValueError("the first round of an experiment is round 1")
                self._ddb.put_item(**put)
            else:
                if new.round != previous.round + 1:
                    raise ValueError(f"round {new.round} cannot follow round {previous.round}")
                self._ddb.transact_write_items(
                    TransactItems=[
                        {
                            "ConditionCheck": {
                                "TableName": self._table,
                                "Key": self._key(previous.experiment, previous.round),
                                "ConditionExpression": "#s IN (:closed, :abandoned)",
                                "ExpressionAttributeNames": {"#s": "status"},
                                "ExpressionAttributeValues": {
                                    ":closed": {"S": RoundState.CLOSED.value},
                                    ":abandoned": {"S": RoundState.ABANDONED.value},
                                },
                            }
                        },
                        {"Put": put},
                    ]
                )
        except ClientError as e:
            if error_code(e) in {"ConditionalCheckFailedException", "TransactionCanceledException"}:
                return False
            raise
        return True

    def record_answer(
        self, experiment: str, number: int, client_id: str, answer: Answer
    ) -> RecordOutcome:
        """Record a selected client's answer once, while the round is OPEN."""
        try:
            response = self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression="SET answers.#c = :answer",
                ConditionExpression=(
                    "#s = :open AND contains(selected, :client) "
                    "AND attribute_not_exists(answers.#c)"
                ),
                ExpressionAttributeNames={"#c": client_id, "#s": "status"},
                ExpressionAttributeValues={
                    ":answer": serialize(answer.to_dict()),
                    ":open": {"S": RoundState.OPEN.value},
                    ":client": {"S": client_id},
                },
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as e:
            if error_code(e) != "ConditionalCheckFailedException":
                raise
            old: Any = e.response.get("Item")
            current = Round.from_item(old) if old else self.get(experiment, number)
            if current is None:
                return RecordOutcome(RecordResult.NO_SUCH_ROUND, None)
            if client_id in current.answers:
                return RecordOutcome(RecordResult.ALREADY_ANSWERED, current)
            if client_id not in current.selected:
                return RecordOutcome(RecordResult.NOT_SELECTED, current)
            return RecordOutcome(RecordResult.NOT_OPEN, current)
        return RecordOutcome(RecordResult.RECORDED, Round.from_item(response["Attributes"]))

    def record_other_rejection(
        self, experiment: str, number: int, rejection: dict[str, Any]
    ) -> bool:
        """Keep a rejection that is not a selected client's answer: counted per reason, and
        kept once per client and reason (with how many objects, the last one's key and ETag;
        a repeated delivery of one object adds nothing) for up to a bound of pairs."""
        try:
            return self._record_other_rejection(experiment, number, rejection)
        except ClientError as e:
            if error_code(e) != "ValidationException":
                raise
        # A round written by an earlier version has no rejection_counts map to count in.
        try:
            self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression="SET rejection_counts = :empty",
                ConditionExpression=(
                    "attribute_exists(#r) AND attribute_not_exists(rejection_counts)"
                ),
                ExpressionAttributeNames={"#r": "round"},
                ExpressionAttributeValues={":empty": {"M": {}}},
            )
        except ClientError as e:
            if error_code(e) != "ConditionalCheckFailedException":
                raise
        return self._record_other_rejection(experiment, number, rejection)

    def _record_other_rejection(
        self, experiment: str, number: int, rejection: dict[str, Any]
    ) -> bool:
        key = rejection_key(rejection)
        names = {"#k": key, "#reason": str(rejection.get("reason", ""))}
        etag = serialize(str(rejection.get("etag", "")))
        try:
            self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression=(
                    "SET other_rejections.#k = :r, "
                    "rejection_counts.#reason = if_not_exists(rejection_counts.#reason, :zero) "
                    "+ :one"
                ),
                ConditionExpression=(
                    "attribute_exists(#r) AND attribute_not_exists(other_rejections.#k) "
                    "AND size(other_rejections) < :cap"
                ),
                ExpressionAttributeNames={**names, "#r": "round"},
                ExpressionAttributeValues={
                    ":r": serialize({**rejection, "count": 1}),
                    ":cap": {"N": str(MAX_OTHER_REJECTIONS)},
                    ":zero": {"N": "0"},
                    ":one": {"N": "1"},
                },
            )
            return True
        except ClientError as e:
            if error_code(e) != "ConditionalCheckFailedException":
                raise
        # Seen this (client, reason) before, or the record is full: count, if a new object.
        try:
            self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression=(
                    "SET other_rejections.#k.#count = other_rejections.#k.#count + :one, "
                    "other_rejections.#k.#etag = :etag, other_rejections.#k.#key = :key, "
                    "rejection_counts.#reason = if_not_exists(rejection_counts.#reason, :zero) "
                    "+ :one"
                ),
                ConditionExpression=(
                    "attribute_exists(other_rejections.#k) AND other_rejections.#k.#etag <> :etag"
                ),
                ExpressionAttributeNames={
                    **names,
                    "#count": "count",
                    "#etag": "etag",
                    "#key": "key",
                },
                ExpressionAttributeValues={
                    ":etag": etag,
                    ":key": serialize(str(rejection.get("key", ""))),
                    ":zero": {"N": "0"},
                    ":one": {"N": "1"},
                },
            )
            return True
        except ClientError as e:
            if error_code(e) != "ConditionalCheckFailedException":
                raise
        return False

    def begin_aggregation(
        self, experiment: str, number: int, owner: str, now: float, lease_seconds: float
    ) -> Round | None:
        """OPEN -> AGGREGATING, or take over an AGGREGATING round whose lease expired.

        Exactly one caller gets the round back; everyone else gets None.
        """
        try:
            response = self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression=(
                    "SET #s = :aggregating, lease_owner = :owner, lease_expires_at = :expires "
                    "ADD aggregation_attempts :one"
                ),
                ConditionExpression=(
                    "#s = :open OR (#s = :aggregating AND lease_expires_at < :now)"
                ),
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":aggregating": {"S": RoundState.AGGREGATING.value},
                    ":open": {"S": RoundState.OPEN.value},
                    ":owner": {"S": owner},
                    ":expires": serialize(now + lease_seconds),
                    ":now": serialize(now),
                    ":one": {"N": "1"},
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return None
            raise
        return Round.from_item(response["Attributes"])

    def close(
        self,
        experiment: str,
        number: int,
        owner: str,
        model_version: int,
        now: float,
        summary: Mapping[str, Any],
    ) -> bool:
        """AGGREGATING -> CLOSED, only by the lease holder."""
        try:
            self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression=(
                    "SET #s = :closed, model_version = :v, finished_at = :now, summary = :summary "
                    "REMOVE lease_owner, lease_expires_at"
                ),
                ConditionExpression="#s = :aggregating AND lease_owner = :owner",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":closed": {"S": RoundState.CLOSED.value},
                    ":aggregating": {"S": RoundState.AGGREGATING.value},
                    ":owner": {"S": owner},
                    ":v": {"N": str(model_version)},
                    ":now": serialize(now),
                    ":summary": serialize(storable(summary)),
                },
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def record_evaluation(
        self, experiment: str, number: int, evaluation: Mapping[str, Any]
    ) -> bool:
        """The new model's held-out scores, on a round that exists (written after closing)."""
        try:
            self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression="SET evaluation = :e",
                ConditionExpression="attribute_exists(#r)",
                ExpressionAttributeNames={"#r": "round"},
                ExpressionAttributeValues={":e": serialize(storable(evaluation))},
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def abandon_stuck(self, experiment: str, number: int, reason: str, now: float) -> bool:
        """AGGREGATING -> ABANDONED when the last lease expired and no more attempts are
        allowed (every attempt crashed or timed out); one caller wins."""
        return self._abandon(
            experiment,
            number,
            reason,
            now,
            "#s = :aggregating AND lease_expires_at < :now",
            {":aggregating": {"S": RoundState.AGGREGATING.value}},
        )

    def abandon(
        self, experiment: str, number: int, reason: str, now: float, owner: str | None = None
    ) -> bool:
        """OPEN -> ABANDONED (deadline passed without quorum), or AGGREGATING -> ABANDONED
        by the lease holder (nothing acceptable to aggregate)."""
        if owner is None:
            condition = "#s = :open"
            values = {":open": {"S": RoundState.OPEN.value}}
        else:
            condition = "#s = :aggregating AND lease_owner = :owner"
            values = {
                ":aggregating": {"S": RoundState.AGGREGATING.value},
                ":owner": {"S": owner},
            }
        return self._abandon(experiment, number, reason, now, condition, values)

    def _abandon(
        self,
        experiment: str,
        number: int,
        reason: str,
        now: float,
        condition: str,
        values: Mapping[str, Any],
    ) -> bool:
        try:
            self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression=(
                    "SET #s = :abandoned, abandon_reason = :reason, finished_at = :now "
                    "REMOVE lease_owner, lease_expires_at"
                ),
                ConditionExpression=condition,
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":abandoned": {"S": RoundState.ABANDONED.value},
                    ":reason": {"S": reason},
                    ":now": serialize(now),
                    **values,
                },
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return False
            raise
        return True
