"""``RoundStore``: every read and every write of a round and its slots in the rounds table.

Each transition is one conditional write (``sfl.state.conditional``); a refused condition is
an outcome (False, None, a ``RecordResult``), never an exception. An answer is one
transaction over the round item's counters and the client's slot, retried on a conflict.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from sfl.state.conditional import conditional
from sfl.state.dynamo import from_item, serialize
from sfl.state.rounds.keys import (
    NEWEST_ATTRIBUTE,
    newest_key,
    round_key,
    slot_key,
    slot_partition,
)
from sfl.state.rounds.records import (
    Answer,
    Outcome,
    RecordOutcome,
    RecordResult,
    Round,
    RoundState,
    Slot,
    rejection_reason,
    storable,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

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
BATCH_GET_KEYS = 100  # DynamoDB's BatchGetItem limit
# A window of more rounds than this (``models list --all``: the whole history) is read by
# Query, a page per MB, rather than by key, a request per 100 rounds.
MAX_KEYED_ROUNDS = 1_000


class RoundOutcome(NamedTuple):
    """A round in brief: its state, the model version it started from and the one it wrote."""

    round: int
    status: str
    base_version: int
    model_version: int | None


class RoundRefusals(NamedTuple):
    """How many of a round's selected clients' answers were refused (rejected or declined;
    None for an item from before the counters, which holds its answers itself), and how
    many uploads from clients it did not select it rejected (only such old items count
    them)."""

    round: int
    refused: int | None
    strays: int


def projection(attributes: tuple[str, ...]) -> dict[str, Any]:
    """A ``ProjectionExpression`` of ``attributes`` (``a.b``: the map ``a``'s key ``b``),
    every name a placeholder (so that no reserved word can break it)."""
    names: dict[str, str] = {}
    paths = []
    for attribute in attributes:
        parts = []
        for name in attribute.split("."):
            placeholder = next((k for k, v in names.items() if v == name), f"#a{len(names)}")
            names[placeholder] = name
            parts.append(placeholder)
        paths.append(".".join(parts))
    return {"ProjectionExpression": ", ".join(paths), "ExpressionAttributeNames": names}


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
            TableName=self._table, Key=round_key(experiment, number), ConsistentRead=True
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

    def recent(
        self,
        experiment: str,
        count: int,
        *,
        slots: bool = False,
        attributes: tuple[str, ...] | None = None,
    ) -> list[Round]:
        """The newest ``count`` rounds, oldest first: what reading them costs does not grow
        with the history (by key, ``by_key``; else a page per ~1 MB of round items).
        ``attributes``: only those of each item (paths such as ``summary.participants``
        too; what ``Round.from_item`` requires among them), the rest left at their defaults."""
        items = self.by_key(experiment, count, attributes)
        if items is None:
            items = self._query_newest(experiment, count, attributes)
        rounds = [Round.from_item(i) for i in reversed(items)]
        return [self.with_slots(r) for r in rounds] if slots else rounds

    def newest_number(self, experiment: str) -> int | None:
        """The newest round's number (one read of the item created with it); None if no
        round was created since that item was (a store from before it: ask ``latest``)."""
        response = self._ddb.get_item(
            TableName=self._table,
            Key=newest_key(experiment),
            ProjectionExpression="#n",
            ExpressionAttributeNames={"#n": NEWEST_ATTRIBUTE},
            ConsistentRead=True,
        )
        value = response.get("Item", {}).get(NEWEST_ATTRIBUTE, {}).get("N")
        return int(value) if value is not None else None

    def by_key(
        self, experiment: str, count: int, attributes: tuple[str, ...] | None = None
    ) -> list[dict[str, Any]] | None:
        """The newest ``count`` round items (only ``attributes``, if given), newest first,
        read by key: the newest round's number (``newest_number``), then one BatchGetItem per
        100 rounds, which costs what the items do, whatever the history's length. The round
        after the newest is asked too: if it exists, a round was created without naming
        itself the newest (by code from before that item), and None says to query instead
        (None too for more than ``MAX_KEYED_ROUNDS``)."""
        if count > MAX_KEYED_ROUNDS:
            return None
        newest = self.newest_number(experiment)
        if newest is None:
            return None
        numbers = list(range(newest + 1, max(0, newest - count), -1))
        found = self._get_rounds(experiment, numbers, attributes)
        if newest + 1 in found:
            return None
        return [found[n] for n in numbers if n in found]

    def _get_rounds(
        self, experiment: str, numbers: list[int], attributes: tuple[str, ...] | None
    ) -> dict[int, dict[str, Any]]:
        """Round items by number (BatchGetItem, 100 keys a call, unprocessed keys asked
        again); a number with no item is absent."""
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(numbers), BATCH_GET_KEYS):
            request: dict[str, Any] = {
                "Keys": [round_key(experiment, n) for n in numbers[start : start + BATCH_GET_KEYS]],
                "ConsistentRead": True,
            }
            if attributes is not None:
                # The key too: it says which round an item is.
                request.update(projection(("round", *(a for a in attributes if a != "round"))))
            pending: dict[str, Any] = {self._table: request}
            attempt = 0
            while pending:
                response = self._ddb.batch_get_item(RequestItems=pending)
                for item in response.get("Responses", {}).get(self._table, []):
                    found[int(item["round"]["N"])] = item
                pending = dict(response.get("UnprocessedKeys") or {})
                if pending:
                    attempt += 1
                    self._sleep(min(1.0, 0.05 * 2**attempt) * random.random())
        return found

    def recent_outcomes(self, experiment: str, count: int) -> list[RoundOutcome]:
        """The newest ``count`` rounds in brief, newest first: four attributes of each item,
        for counting and finding model versions without reading whole round items."""
        return [
            RoundOutcome(
                round=int(d["round"]),
                status=str(d["status"]),
                base_version=int(d.get("base_version", 0)),
                model_version=None if d.get("model_version") is None else int(d["model_version"]),
            )
            for d in self._newest(
                experiment, count, ("round", "status", "base_version", "model_version")
            )
        ]

    def recent_refusals(self, experiment: str, count: int) -> list[RoundRefusals]:
        """The newest ``count`` rounds' refusal counts, newest first (``RoundRefusals``)."""
        attributes = ("round", "rejected_count", "declined_count", "rejection_counts")
        return [
            RoundRefusals(
                round=int(d["round"]),
                refused=int(d.get("rejected_count", 0)) + int(d.get("declined_count", 0))
                if "rejected_count" in d
                else None,
                strays=sum(int(v) for v in d.get("rejection_counts", {}).values()),
            )
            for d in self._newest(experiment, count, attributes)
        ]

    def _newest(
        self, experiment: str, count: int, attributes: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        """``attributes`` of the newest ``count`` round items, newest first: by key, else a
        query (pages of at most ``count`` items): the cost does not grow with the history."""
        items = self.by_key(experiment, count, attributes)
        if items is None:
            items = self._query_newest(experiment, count, attributes)
        return [from_item(item) for item in items]

    def _query_newest(
        self, experiment: str, count: int, attributes: tuple[str, ...] | None
    ) -> list[dict[str, Any]]:
        """The newest ``count`` round items (only ``attributes``, if given), newest first,
        from a query of the experiment's partition."""
        found: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "experiment = :e",
            "ExpressionAttributeValues": {":e": {"S": experiment}},
            "ScanIndexForward": False,
            "ConsistentRead": True,
        }
        if attributes is not None:
            kwargs.update(projection(attributes))
        while len(found) < count:
            response = self._ddb.query(**kwargs, Limit=count - len(found))
            found.extend(response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                break
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return found

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
        accepted answer, ``only="refused"`` those rejected or declined, ``only="unanswered"``
        those still waiting; None: all of them."""
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "experiment = :p",
            "ExpressionAttributeValues": {":p": {"S": slot_partition(experiment, number)}},
            "ConsistentRead": True,
        }
        if only == "accepted":
            kwargs["FilterExpression"] = "outcome = :accepted"
            kwargs["ExpressionAttributeValues"][":accepted"] = {"S": Outcome.ACCEPTED.value}
        elif only == "refused":
            kwargs["FilterExpression"] = "outcome IN (:rejected, :declined)"
            kwargs["ExpressionAttributeValues"][":rejected"] = {"S": Outcome.REJECTED.value}
            kwargs["ExpressionAttributeValues"][":declined"] = {"S": Outcome.DECLINED.value}
        elif only == "unanswered":
            kwargs["FilterExpression"] = "attribute_not_exists(answer)"
            kwargs["ProjectionExpression"] = "client_id"
        elif only is not None:
            raise ValueError(f"unknown slot filter {only!r}")
        while True:
            response = self._ddb.query(**kwargs)
            for item in response.get("Items", []):
                yield Slot.from_item(item)
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def slot(self, experiment: str, number: int, client_id: str) -> Slot | None:
        """A client's slot in a round (one read); None if it was not selected."""
        response = self._ddb.get_item(
            TableName=self._table,
            Key=slot_key(experiment, number, client_id),
            ConsistentRead=True,
        )
        item = response.get("Item")
        if not item or item.get("client_id", {}).get("S") != client_id:
            return None
        return Slot.from_item(item)

    def write_slots(self, round_: Round, selected: tuple[str, ...]) -> None:
        """Write a new round's slots (BatchWriteItem, 25 a call, unprocessed ones retried).

        Plain puts are safe: no answer is recorded before the round's slots_ready flag."""
        expires = int(round_.created_at + SLOT_RETENTION_SECONDS)
        requests = [
            {
                "PutRequest": {
                    "Item": {
                        **slot_key(round_.experiment, round_.round, client),
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
        return conditional(
            self._ddb.update_item,
            TableName=self._table,
            Key=round_key(experiment, number),
            UpdateExpression="SET slots_ready = :true",
            ConditionExpression="#s = :open AND slots_ready = :false",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":open": {"S": RoundState.OPEN.value},
                ":true": {"BOOL": True},
                ":false": {"BOOL": False},
            },
        ).written

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
        """Put round n+1's item and name it the newest (``newest_key``) in one transaction:
        the newest round's number is always exact, and read by key (``recent``)."""
        put = {
            "TableName": self._table,
            "Item": new.to_item(),
            "ConditionExpression": "attribute_not_exists(#r)",
            "ExpressionAttributeNames": {"#r": "round"},
        }
        newest = {
            "TableName": self._table,
            "Key": newest_key(new.experiment),
            "UpdateExpression": "SET #n = :n",
            "ExpressionAttributeNames": {"#n": NEWEST_ATTRIBUTE},
            "ExpressionAttributeValues": {":n": {"N": str(new.round)}},
        }
        if previous is None:
            if new.round != 1:
                raise ValueError("the first round of an experiment is round 1")
            return conditional(
                self._ddb.transact_write_items, TransactItems=[{"Put": put}, {"Update": newest}]
            ).written
        if new.round != previous.round + 1:
            raise ValueError(f"round {new.round} cannot follow round {previous.round}")
        # Any cancellation (round n not finished, n+1 there, a concurrent creation): lost.
        return conditional(
            self._ddb.transact_write_items,
            TransactItems=[
                {
                    "ConditionCheck": {
                        "TableName": self._table,
                        "Key": round_key(previous.experiment, previous.round),
                        "ConditionExpression": "#s IN (:closed, :abandoned)",
                        "ExpressionAttributeNames": {"#s": "status"},
                        "ExpressionAttributeValues": {
                            ":closed": {"S": RoundState.CLOSED.value},
                            ":abandoned": {"S": RoundState.ABANDONED.value},
                        },
                    }
                },
                {"Put": put},
                {"Update": newest},
            ],
        ).written

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
        declined = answer.outcome is Outcome.DECLINED
        counters = (
            "ADD answered_count :one, accepted_count :acc, rejected_count :rej, "
            "declined_count :dec, bytes_up :up, bytes_down :down, handling_seconds :handled"
        )
        names = {"#s": "status"}
        values: dict[str, Any] = {}
        if not accepted:
            # Per reason: a rejection's (the averager's word) or a decline's (from its set).
            per_reason = "answer_declines" if declined else "answer_rejections"
            counters = (
                f"SET {per_reason}.#reason = "
                f"if_not_exists({per_reason}.#reason, :zero) + :one " + counters
            )
            names["#reason"] = rejection_reason(answer.reason)
            values[":zero"] = {"N": "0"}
        items: list[Any] = [
            {
                "Update": {
                    "TableName": self._table,
                    "Key": round_key(experiment, number),
                    "UpdateExpression": counters,
                    "ConditionExpression": "#s = :open AND slots_ready = :true",
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": {
                        **values,
                        ":open": {"S": RoundState.OPEN.value},
                        ":true": {"BOOL": True},
                        ":one": {"N": "1"},
                        ":acc": {"N": "1" if accepted else "0"},
                        ":rej": {"N": "0" if accepted or declined else "1"},
                        ":dec": {"N": "1" if declined else "0"},
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
                    "Key": slot_key(experiment, number, client_id),
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
            write = conditional(self._ddb.transact_write_items, TransactItems=items)
            if write.written:
                return RecordOutcome(
                    RecordResult.RECORDED, self.get(experiment, number, slots=False)
                )
            if write.retryable and attempt < MAX_TRANSACTION_ATTEMPTS:
                self._sleep(min(1.0, 0.02 * 2**attempt) * random.random())
                continue
            if "ConditionalCheckFailed" not in write.codes:
                write.raise_refusal()
            return self._refused(experiment, number, client_id, write.reasons)
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
            Slot.from_item(slot_item)
            if slot_item and slot_item.get("client_id", {}).get("S") == client_id
            else self.slot(experiment, number, client_id)
        )
        return RecordOutcome.refused(current, slot)

    def begin_aggregation(
        self, experiment: str, number: int, owner: str, now: float, lease_seconds: float
    ) -> Round | None:
        """OPEN -> AGGREGATING, or take over an AGGREGATING round whose lease expired.

        Exactly one caller gets the round back; everyone else gets None.
        """
        write = conditional(
            self._ddb.update_item,
            TableName=self._table,
            Key=round_key(experiment, number),
            UpdateExpression=(
                "SET #s = :aggregating, lease_owner = :owner, lease_expires_at = :expires "
                "ADD aggregation_attempts :one"
            ),
            ConditionExpression=("#s = :open OR (#s = :aggregating AND lease_expires_at < :now)"),
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
        return Round.from_item(write.response["Attributes"]) if write.written else None

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
        return conditional(
            self._ddb.update_item,
            TableName=self._table,
            Key=round_key(experiment, number),
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
        ).written

    def record_evaluation(
        self, experiment: str, number: int, evaluation: Mapping[str, Any]
    ) -> bool:
        """The new model's held-out scores, on a round that exists (written after closing)."""
        return conditional(
            self._ddb.update_item,
            TableName=self._table,
            Key=round_key(experiment, number),
            UpdateExpression="SET evaluation = :e",
            ConditionExpression="attribute_exists(#r)",
            ExpressionAttributeNames={"#r": "round"},
            ExpressionAttributeValues={":e": serialize(storable(evaluation))},
        ).written

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
        return conditional(
            self._ddb.update_item,
            TableName=self._table,
            Key=round_key(experiment, number),
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
        ).written
