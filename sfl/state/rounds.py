"""Round records and their transitions: OPEN -> AGGREGATING -> CLOSED, or -> ABANDONED.

Every transition is one DynamoDB conditional write, so concurrent initiators and
averagers agree without locks: at most one round is open, each client answers a round
once, and exactly one aggregation wins (with a lease, so a crashed one is retried).

A round of any size: the round item holds only bounded fields and atomic counters; each
selected client has its own *slot* item (its answer, once it answered), in the same table
under the partition ``<experiment>#slots#<round>``, read with a paginated query. An answer
is one transaction: the slot gets the answer and the round item's counters grow, or neither
(docs/scale.md).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sfl.state.aws import error_code
from sfl.state.dynamo import from_item, serialize, to_item

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

logger = logging.getLogger(__name__)

# Rejections that are not a selected client's answer (unselected senders, late or repeated
# uploads) are kept on the round record once per client and reason, with a count of how many
# objects it was, for up to this many (client, reason) pairs; beyond that only the per-reason
# counts grow. A device flooding uploads fills one entry, not the record.
MAX_OTHER_REJECTIONS = 100
# Slot items expire (DynamoDB TTL) this long after their round started; the round item keeps
# the counts and the summary for good.
SLOT_RETENTION_SECONDS = 90 * 24 * 3600
# A round whose slots are not all written this long after it was created lost its initiator
# (a Lambda runs 15 min at most): the next initiator abandons it. No answer can have been
# recorded: answers need the round's slots_ready flag.
SLOT_WRITE_GRACE_SECONDS = 15 * 60
# TransactionConflict (another transaction on the round item at the same moment) is retried
# this many times with jittered backoff before the error goes up (and the S3 event is retried).
MAX_TRANSACTION_ATTEMPTS = 8
BATCH_WRITE_ITEMS = 25  # DynamoDB's BatchWriteItem limit
SLOTS_MARKER = "#slots#"


def slot_partition(experiment: str, number: int) -> str:
    """The partition key of a round's slot items in the rounds table."""
    return f"{experiment}{SLOTS_MARKER}{number}"


def slot_sort_key(client_id: str) -> int:
    """A slot's numeric sort key (the rounds table's sort key is a number): 120 bits of the
    client id's SHA-256, within DynamoDB's 38 digits. The slot also holds the client id and
    every condition checks it, so even a collision cannot mix two clients' answers."""
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:15], "big")


def rejection_reason(reason: str) -> str:
    """A rejected answer's reason without its detail ("shape: ..." -> "shape"): one of the
    averager's own words, so a bounded set of map keys."""
    return reason.split(":")[0][:64] or "unknown"


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
    # The runtime configuration the round runs with (sfl.state.control): its version (0: as
    # deployed) and every key's value, so the averager judges it by the same settings.
    config_version: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    # The new model's scores on the held-out evaluation set, written after the round closed.
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    # Atomic counters on the round item, grown in the same transaction as each answer; the
    # per-client ``selected`` and ``answers`` are in slot items, loaded only on request.
    selected_count: int = 0
    answered_count: int = 0
    accepted_count: int = 0
    rejected_count: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    # Seconds the averager spent judging the recorded answers (for the round's cost).
    handling_seconds: float = 0.0
    answer_rejections: Mapping[str, int] = field(default_factory=dict)  # per reason
    slots_ready: bool = True  # False until the initiator wrote every slot
    slots_loaded: bool = True  # selected/answers hold the slots (False: counters only)

    @property
    def accepted(self) -> dict[str, Answer]:
        return {c: a for c, a in sorted(self.answers.items()) if a.outcome is Outcome.ACCEPTED}

    @property
    def rejected(self) -> dict[str, Answer]:
        return {c: a for c, a in sorted(self.answers.items()) if a.outcome is Outcome.REJECTED}

    # Counts that need no slots: the counters when stored, else the loaded slots.
    @property
    def num_selected(self) -> int:
        return self.selected_count or len(self.selected)

    @property
    def num_answered(self) -> int:
        return self.answered_count or len(self.answers)

    @property
    def num_accepted(self) -> int:
        return self.accepted_count or len(self.accepted)

    @property
    def num_rejected(self) -> int:
        return self.rejected_count or len(self.rejected)

    @property
    def rejection_reasons(self) -> dict[str, int]:
        """Selected clients' rejected answers per reason: the round item's counts, or (a
        round written before them) its loaded answers."""
        if self.answer_rejections:
            return {k: int(v) for k, v in self.answer_rejections.items()}
        reasons: dict[str, int] = {}
        for answer in self.rejected.values():
            reason = rejection_reason(answer.reason)
            reasons[reason] = reasons.get(reason, 0) + 1
        return reasons

    def to_item(self) -> dict[str, Any]:
        return to_item(
            {
                "experiment": self.experiment,
                "round": self.round,
                "status": self.status.value,
                "base_version": self.base_version,
                "selected_count": self.num_selected,
                "answered_count": self.answered_count,
                "accepted_count": self.accepted_count,
                "rejected_count": self.rejected_count,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "handling_seconds": self.handling_seconds,
                "slots_ready": self.slots_ready,
                "answer_rejections": dict(self.answer_rejections),
                "created_at": self.created_at,
                "deadline_at": self.deadline_at,
                "soft_deadline_at": self.soft_deadline_at or self.deadline_at,
                "train_config": dict(self.train_config),
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
        # A round written before slots existed holds its clients and answers itself.
        legacy = "selected" in d
        answers = {c: Answer.from_dict(a) for c, a in d.get("answers", {}).items()}
        selected = tuple(d.get("selected", []))
        return cls(
            experiment=d["experiment"],
            round=int(d["round"]),
            status=RoundState(d["status"]),
            base_version=int(d["base_version"]),
            selected=selected,
            created_at=float(d["created_at"]),
            deadline_at=float(d["deadline_at"]),
            soft_deadline_at=float(d.get("soft_deadline_at", d["deadline_at"])),
            train_config=d.get("train_config", {}),
            answers=answers,
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
            selected_count=int(d.get("selected_count", len(selected))),
            answered_count=int(d.get("answered_count", len(answers))),
            accepted_count=int(
                d.get(
                    "accepted_count", sum(a.outcome is Outcome.ACCEPTED for a in answers.values())
                )
            ),
            rejected_count=int(
                d.get(
                    "rejected_count", sum(a.outcome is Outcome.REJECTED for a in answers.values())
                )
            ),
            bytes_up=int(d.get("bytes_up", sum(a.size for a in answers.values()))),
            bytes_down=int(d.get("bytes_down", sum(a.bytes_down for a in answers.values()))),
            handling_seconds=float(d.get("handling_seconds", 0.0)),
            answer_rejections={k: int(v) for k, v in d.get("answer_rejections", {}).items()},
            slots_ready=bool(d.get("slots_ready", True)),
            slots_loaded=legacy,
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
    round: Round | None  # the round item (counters, no slots) after the attempt
    answer: Answer | None = None  # ALREADY_ANSWERED: the answer recorded before


@dataclass(frozen=True)
class Slot:
    """One selected client's place in a round: its answer once it answered."""

    client_id: str
    answer: Answer | None


class RoundStore:
    """Round records in the rounds table; every write is conditional."""

    def __init__(
        self,
        dynamodb: DynamoDBClient,
        table_name: str,
        *,
        sleep: Any = time.sleep,
    ) -> None:
        self._ddb = dynamodb
        self._table = table_name
        self._sleep = sleep

    def _key(self, experiment: str, number: int) -> dict[str, Any]:
        return {"experiment": {"S": experiment}, "round": {"N": str(number)}}

    def _slot_key(self, experiment: str, number: int, client_id: str) -> dict[str, Any]:
        return {
            "experiment": {"S": slot_partition(experiment, number)},
            "round": {"N": str(slot_sort_key(client_id))},
        }

    def latest(self, experiment: str, *, slots: bool = True) -> Round | None:
        """The newest round; ``slots=False`` reads only its item (counters, no clients)."""
        response = self._ddb.query(
            TableName=self._table,
            KeyConditionExpression="experiment = :e",
            ExpressionAttributeValues={":e": {"S": experiment}},
            ScanIndexForward=False,
            Limit=1,
            ConsistentRead=True,
        )
        items = response.get("Items", [])
        if not items:
            return None
        latest = Round.from_item(items[0])
        return self.with_slots(latest) if slots else latest

    def get(self, experiment: str, number: int, *, slots: bool = True) -> Round | None:
        """A round; ``slots=False`` reads only its item: one read, whatever its size."""
        response = self._ddb.get_item(
            TableName=self._table, Key=self._key(experiment, number), ConsistentRead=True
        )
        item = response.get("Item")
        if not item:
            return None
        round_ = Round.from_item(item)
        return self.with_slots(round_) if slots else round_

    def history(self, experiment: str, *, slots: bool = True) -> list[Round]:
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
                return [self.with_slots(r) for r in rounds] if slots else rounds
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    # --- slots ----------------------------------------------------------------------------

    def with_slots(self, round_: Round) -> Round:
        """The round with ``selected`` and ``answers`` read from its slots."""
        if round_.slots_loaded:
            return round_
        selected: list[str] = []
        answers: dict[str, Answer] = {}
        for slot in self.slots(round_.experiment, round_.round):
            selected.append(slot.client_id)
            if slot.answer is not None:
                answers[slot.client_id] = slot.answer
        return replace(round_, selected=tuple(sorted(selected)), answers=answers, slots_loaded=True)

    def slots(self, experiment: str, number: int, *, only: str | None = None) -> Iterator[Slot]:
        """A round's slots, page by page (1 MB each): ``only="accepted"`` those with an
        accepted answer, ``only="unanswered"`` those still waiting; None: all of them."""
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "experiment = :p",
            "ExpressionAttributeValues": {":p": {"S": slot_partition(experiment, number)}},
            "ConsistentRead": True,
        }
        if only == "accepted":
            kwargs["FilterExpression"] = "outcome = :accepted"
            kwargs["ExpressionAttributeValues"][":accepted"] = {"S": Outcome.ACCEPTED.value}
        elif only == "unanswered":
            kwargs["FilterExpression"] = "attribute_not_exists(answer)"
            kwargs["ProjectionExpression"] = "client_id"
        elif only is not None:
            raise ValueError(f"unknown slot filter {only!r}")
        while True:
            response = self._ddb.query(**kwargs)
            for item in response.get("Items", []):
                yield _slot_from_item(item)
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def slot(self, experiment: str, number: int, client_id: str) -> Slot | None:
        """A client's slot in a round (one read); None if it was not selected."""
        response = self._ddb.get_item(
            TableName=self._table,
            Key=self._slot_key(experiment, number, client_id),
            ConsistentRead=True,
        )
        item = response.get("Item")
        if not item or item.get("client_id", {}).get("S") != client_id:
            return None
        return _slot_from_item(item)

    def write_slots(self, round_: Round, selected: tuple[str, ...]) -> None:
        """Write a new round's slots (BatchWriteItem, 25 a call, unprocessed ones retried).

        Plain puts are safe: no answer is recorded before the round's slots_ready flag."""
        expires = int(round_.created_at + SLOT_RETENTION_SECONDS)
        requests = [
            {
                "PutRequest": {
                    "Item": {
                        **self._slot_key(round_.experiment, round_.round, client),
                        "client_id": {"S": client},
                        "expires_at": {"N": str(expires)},
                    }
                }
            }
            for client in selected
        ]
        for start in range(0, len(requests), BATCH_WRITE_ITEMS):
            pending: list[Any] = requests[start : start + BATCH_WRITE_ITEMS]
            attempt = 0
            while pending:
                response = self._ddb.batch_write_item(RequestItems={self._table: pending})
                pending = list(response.get("UnprocessedItems", {}).get(self._table, []))
                if pending:
                    attempt += 1
                    self._sleep(min(1.0, 0.05 * 2**attempt) * random.random())

    def create(self, new: Round, previous: Round | None) -> bool:
        """Create round n+1 only if round n is finished and n+1 does not exist yet, then write
        its slots and mark them ready; answers are accepted only from then on.

        Returns False when another initiator won the race (or round n is still going, or the
        half-made round was abandoned meanwhile).
        """
        if not self._create_item(replace(new, slots_ready=False), previous):
            return False
        self.write_slots(new, new.selected)
        return self._mark_slots_ready(new.experiment, new.round)

    def _mark_slots_ready(self, experiment: str, number: int) -> bool:
        try:
            self._ddb.update_item(
                TableName=self._table,
                Key=self._key(experiment, number),
                UpdateExpression="SET slots_ready = :true",
                ConditionExpression="#s = :open AND slots_ready = :false",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":open": {"S": RoundState.OPEN.value},
                    ":true": {"BOOL": True},
                    ":false": {"BOOL": False},
                },
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def abandon_unready(self, experiment: str, number: int, now: float) -> bool:
        """OPEN -> ABANDONED for a round whose initiator stopped before writing all its
        slots (past the grace period); it accepted nothing, so nothing is lost."""
        return self._abandon(
            experiment,
            number,
            "the initiator stopped before the round's slots were written",
            now,
            "#s = :open AND slots_ready = :false AND created_at < :since",
            {
                ":open": {"S": RoundState.OPEN.value},
                ":false": {"BOOL": False},
                ":since": serialize(now - SLOT_WRITE_GRACE_SECONDS),
            },
        )

    def _create_item(self, new: Round, previous: Round | None) -> bool:
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
        self,
        experiment: str,
        number: int,
        client_id: str,
        answer: Answer,
        *,
        handling_seconds: float = 0.0,
    ) -> RecordOutcome:
        """Record a selected client's answer once, while the round is OPEN: one transaction
        puts the answer in the client's slot and grows the round's counters, or does neither.
        A TransactionConflict (a concurrent answer on the same round item) is retried."""
        accepted = answer.outcome is Outcome.ACCEPTED
        counters = (
            "ADD answered_count :one, accepted_count :acc, rejected_count :rej, "
            "bytes_up :up, bytes_down :down, handling_seconds :handled"
        )
        names = {"#s": "status"}
        values: dict[str, Any] = {}
        if not accepted:
            counters = (
                "SET answer_rejections.#reason = "
                "if_not_exists(answer_rejections.#reason, :zero) + :one " + counters
            )
            names["#reason"] = rejection_reason(answer.reason)
            values[":zero"] = {"N": "0"}
        items: list[Any] = [
            {
                "Update": {
                    "TableName": self._table,
                    "Key": self._key(experiment, number),
                    "UpdateExpression": counters,
                    "ConditionExpression": "#s = :open AND slots_ready = :true",
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": {
                        **values,
                        ":open": {"S": RoundState.OPEN.value},
                        ":true": {"BOOL": True},
                        ":one": {"N": "1"},
                        ":acc": {"N": "1" if accepted else "0"},
                        ":rej": {"N": "0" if accepted else "1"},
                        ":up": {"N": str(max(0, int(answer.size)))},
                        ":down": {"N": str(max(0, int(answer.bytes_down)))},
                        ":handled": serialize(max(0.0, round(handling_seconds, 6))),
                    },
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
            {
                "Update": {
                    "TableName": self._table,
                    "Key": self._slot_key(experiment, number, client_id),
                    "UpdateExpression": "SET answer = :answer, outcome = :outcome",
                    "ConditionExpression": "client_id = :client AND attribute_not_exists(answer)",
                    "ExpressionAttributeValues": {
                        ":answer": serialize(answer.to_dict()),
                        ":outcome": {"S": answer.outcome.value},
                        ":client": {"S": client_id},
                    },
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        ]
        for attempt in range(1, MAX_TRANSACTION_ATTEMPTS + 1):
            try:
                self._ddb.transact_write_items(TransactItems=items)
            except ClientError as e:
                if error_code(e) != "TransactionCanceledException":
                    raise
                reasons = _cancellation_reasons(e)
                codes = {r.get("Code") for r in reasons}
                if codes & RETRIED_CANCELLATIONS and attempt < MAX_TRANSACTION_ATTEMPTS:
                    self._sleep(min(1.0, 0.02 * 2**attempt) * random.random())
                    continue
                if "ConditionalCheckFailed" not in codes:
                    raise
                return self._refused(experiment, number, client_id, reasons)
            return RecordOutcome(RecordResult.RECORDED, self.get(experiment, number, slots=False))
        raise AssertionError("unreachable")  # pragma: no cover

    def _refused(
        self, experiment: str, number: int, client_id: str, reasons: list[Mapping[str, Any]]
    ) -> RecordOutcome:
        """Why a transaction's condition failed, from the items DynamoDB returned with its
        cancellation reasons (ALL_OLD), reading whatever it did not return."""
        round_item = reasons[0].get("Item") if reasons else None
        slot_item = reasons[1].get("Item") if len(reasons) > 1 else None
        current = (
            Round.from_item(round_item) if round_item else self.get(experiment, number, slots=False)
        )
        if current is None:
            return RecordOutcome(RecordResult.NO_SUCH_ROUND, None)
        slot = (
            _slot_from_item(slot_item)
            if slot_item and slot_item.get("client_id", {}).get("S") == client_id
            else self.slot(experiment, number, client_id)
        )
        if slot is not None and slot.answer is not None:
            return RecordOutcome(RecordResult.ALREADY_ANSWERED, current, slot.answer)
        if slot is None:
            return RecordOutcome(RecordResult.NOT_SELECTED, current)
        return RecordOutcome(RecordResult.NOT_OPEN, current)

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


# Cancellation codes worth another try: a concurrent transaction on one of the items, or
# throttling of the hot round item.
RETRIED_CANCELLATIONS = frozenset(
    {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}
)


def _cancellation_reasons(e: ClientError) -> list[Mapping[str, Any]]:
    """TransactionCanceledException's reasons, one per item in request order (botocore
    parses them from real DynamoDB's and moto's error body alike)."""
    reasons = e.response.get("CancellationReasons")
    return list(reasons) if isinstance(reasons, list) else []


def _slot_from_item(item: Mapping[str, Any]) -> Slot:
    d = from_item(item)
    answer = d.get("answer")
    return Slot(
        client_id=str(d.get("client_id", "")),
        answer=Answer.from_dict(answer) if isinstance(answer, Mapping) else None,
    )
