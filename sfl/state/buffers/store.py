"""``BufferStore``: every read and write of buffered mode in the rounds table.

Each change is one conditional write or one transaction (``sfl.state.conditional``): issuing
tickets grows the pool's counters only while places are free; a ticket ends once (answered
or expired) in the same transaction that frees its place and, for an accepted update, joins
it to a buffer that still has room; a buffer is stepped by one lease holder, only when the
version before it exists, and closed in the transaction that moves the pool's version on.
A refused condition is an outcome, never an exception (docs/buffered.md).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sfl.state.buffers.records import (
    AnswerOutcome,
    AnswerResult,
    Buffer,
    BufferState,
    Member,
    Pool,
    Ticket,
    TicketState,
)
from sfl.state.conditional import conditional
from sfl.state.dynamo import serialize, to_item
from sfl.state.rounds.records import Answer, Outcome, rejection_reason, storable

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

# Tickets and buffer members expire (DynamoDB TTL) this long after they were written; the
# pool and the buffers (counts, versions, summaries) stay.
TICKET_RETENTION_SECONDS = 90 * 24 * 3600
# A transaction holds at most 100 items: the pool and two per ticket.
MAX_TICKETS_PER_ISSUE = 49
MAX_TRANSACTION_ATTEMPTS = 8


# The partitions' suffixes after the experiment's name (IAM grants name them as leading keys).
POOL_SUFFIX = "#pool"
TICKETS_SUFFIX = "#tickets"
TRAINING_SUFFIX = "#training"
BUFFERS_SUFFIX = "#buffers"
MEMBERS_INFIX = "#buffer#"


def _key(partition: str, sort: int) -> dict[str, Any]:
    return {"experiment": {"S": partition}, "round": {"N": str(sort)}}


def pool_key(experiment: str) -> dict[str, Any]:
    return _key(experiment + POOL_SUFFIX, 0)


def ticket_key(experiment: str, number: int) -> dict[str, Any]:
    """A ticket's record, kept after it ended."""
    return _key(experiment + TICKETS_SUFFIX, number)


def training_key(experiment: str, number: int) -> dict[str, Any]:
    """An open ticket's place: the item exists exactly while the ticket is OPEN, so the
    devices training now are one query of at most ``concurrency`` items."""
    return _key(experiment + TRAINING_SUFFIX, number)


def buffer_key(experiment: str, number: int) -> dict[str, Any]:
    return _key(experiment + BUFFERS_SUFFIX, number)


def member_partition(experiment: str, buffer: int) -> str:
    return f"{experiment}{MEMBERS_INFIX}{buffer}"


class BufferStore:
    """Buffered mode's records in the rounds table; every write is conditional."""

    def __init__(self, dynamodb: DynamoDBClient, table_name: str, *, sleep: Any = time.sleep):
        self._ddb = dynamodb
        self._table = table_name
        self._sleep = sleep

    # --- reads ----------------------------------------------------------------------------

    def _get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        item = self._ddb.get_item(TableName=self._table, Key=dict(key), ConsistentRead=True).get(
            "Item"
        )
        return dict(item) if item else None

    def _query(
        self, partition: str, *, newest_first: bool = False, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "experiment = :p",
            "ExpressionAttributeValues": {":p": {"S": partition}},
            "ConsistentRead": True,
            "ScanIndexForward": not newest_first,
        }
        if limit is not None:
            kwargs["Limit"] = limit
        while True:
            response = self._ddb.query(**kwargs)
            yield from response.get("Items", [])
            if limit is not None or "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def pool(self, experiment: str) -> Pool | None:
        item = self._get(pool_key(experiment))
        return Pool.from_item(item) if item else None

    def ticket(self, experiment: str, number: int) -> Ticket | None:
        item = self._get(ticket_key(experiment, number))
        return Ticket.from_item(item) if item else None

    def training(self, experiment: str) -> list[Ticket]:
        """The OPEN tickets, oldest first: at most ``concurrency`` items."""
        return [Ticket.from_item(i) for i in self._query(experiment + TRAINING_SUFFIX)]

    def tickets(self, experiment: str) -> list[Ticket]:
        """Every ticket record, oldest first (operators and tests: grows with the history)."""
        return [Ticket.from_item(i) for i in self._query(experiment + TICKETS_SUFFIX)]

    def buffer(self, experiment: str, number: int) -> Buffer | None:
        item = self._get(buffer_key(experiment, number))
        return Buffer.from_item(item) if item else None

    def newest_buffer(self, experiment: str) -> Buffer | None:
        items = list(self._query(experiment + BUFFERS_SUFFIX, newest_first=True, limit=1))
        return Buffer.from_item(items[0]) if items else None

    def buffers(self, experiment: str) -> list[Buffer]:
        return [Buffer.from_item(i) for i in self._query(experiment + BUFFERS_SUFFIX)]

    def recent_buffers(self, experiment: str, count: int) -> list[Buffer]:
        """The newest ``count`` buffers, oldest first: one page, whatever the history."""
        items = self._query(experiment + BUFFERS_SUFFIX, newest_first=True, limit=count)
        return [Buffer.from_item(i) for i in reversed(list(items))]

    def members(self, experiment: str, buffer: int) -> list[Member]:
        """A buffer's accepted updates in ticket order: the fixed order the step sums in."""
        return [Member.from_item(i) for i in self._query(member_partition(experiment, buffer))]

    # --- the pool and its tickets ---------------------------------------------------------

    def open_pool(
        self, experiment: str, *, start_version: int, first_ticket: int, now: float
    ) -> Pool:
        """The pool, created on first use (one conditional put: concurrent callers agree)."""
        conditional(
            self._ddb.put_item,
            TableName=self._table,
            Item={
                **pool_key(experiment),
                **to_item(
                    {
                        "pool_of": experiment,
                        "next_ticket": first_ticket,
                        "start_version": start_version,
                        "version": start_version,
                        "training": 0,
                        "created_at": now,
                        # per reason; a nested SET needs its map to exist
                        "answer_rejections": {},
                        "answer_declines": {},
                    }
                ),
            },
            ConditionExpression="attribute_not_exists(next_ticket)",
        )
        pool = self.pool(experiment)
        assert pool is not None
        return pool

    def issue(
        self,
        pool: Pool,
        picks: Sequence[str],
        *,
        base_version: int,
        concurrency: int,
        now: float,
        lease_seconds: float,
        candidates: int = 0,
        select_seconds: float = 0.0,
    ) -> list[Ticket]:
        """Tickets ``pool.next_ticket``, ... for ``picks``, in one transaction that takes as
        many places, only while the counter is where ``pool`` read it and places are free;
        [] if another initiator got there first (its tickets stand, these are not made).
        The same write counts the run, the ``candidates`` it read and its ``select_seconds``
        on the pool (what a version's cost is counted from)."""
        picks = list(picks)[:MAX_TICKETS_PER_ISSUE]
        if not picks:
            return []
        first = pool.next_ticket
        tickets = [
            Ticket(
                experiment=pool.experiment,
                number=first + i,
                client_id=client,
                base_version=base_version,
                created_at=now,
                deadline_at=now + lease_seconds,
            )
            for i, client in enumerate(picks)
        ]
        expires = int(now + TICKET_RETENTION_SECONDS)
        items: list[Any] = [
            {
                "Update": {
                    "TableName": self._table,
                    "Key": pool_key(pool.experiment),
                    "UpdateExpression": (
                        "SET next_ticket = :next ADD training :m, issued :m, issue_runs :one, "
                        "candidates :candidates, select_seconds :select"
                    ),
                    "ConditionExpression": "next_ticket = :first AND training <= :room",
                    "ExpressionAttributeValues": {
                        ":next": {"N": str(first + len(picks))},
                        ":first": {"N": str(first)},
                        ":m": {"N": str(len(picks))},
                        ":room": {"N": str(concurrency - len(picks))},
                        ":one": {"N": "1"},
                        ":candidates": {"N": str(max(0, int(candidates)))},
                        ":select": serialize(max(0.0, round(select_seconds, 6))),
                    },
                }
            }
        ]
        for t in tickets:
            body = to_item(
                {
                    "ticket_of": t.experiment,
                    "client_id": t.client_id,
                    "base_version": t.base_version,
                    "created_at": t.created_at,
                    "deadline_at": t.deadline_at,
                    "status": TicketState.OPEN.value,
                    "expires_at": expires,
                }
            )
            for key in (ticket_key, training_key):
                items.append(
                    {
                        "Put": {
                            "TableName": self._table,
                            "Item": {**key(t.experiment, t.number), **body},
                            "ConditionExpression": "attribute_not_exists(client_id)",
                        }
                    }
                )
        if self._transact(items):
            return tickets
        return []

    def _transact(self, items: list[Any]) -> bool:
        """One transaction, retried on a conflict with another; whether it was written.
        A cancellation for any other reason is an outcome: False."""
        for attempt in range(1, MAX_TRANSACTION_ATTEMPTS + 1):
            write = conditional(self._ddb.transact_write_items, TransactItems=items)
            if write.written:
                return True
            if write.retryable and attempt < MAX_TRANSACTION_ATTEMPTS:
                self._sleep(min(1.0, 0.02 * 2**attempt) * random.random())
                continue
            if "ConditionalCheckFailed" not in write.codes:
                write.raise_refusal()
            return False
        raise AssertionError("unreachable")  # pragma: no cover

    def _end(
        self,
        ticket: Ticket,
        *,
        status: TicketState,
        counters: Mapping[str, int | float],
        answer: Answer | None,
        condition: str,
        values: Mapping[str, Any],
        now: float,
        extra: Sequence[Any] = (),
        reason: str = "",
        per_reason: str = "",
    ) -> bool:
        """End an OPEN ticket once: its record, its place and the pool's counters, plus
        ``extra`` items (joining a buffer), in one transaction."""
        e = ticket.experiment
        adds = ", ".join(f"{name} :{name}" for name in counters)
        update = f"ADD training :minus_one, {adds}"
        names: dict[str, str] = {}
        pool_values: dict[str, Any] = {
            ":minus_one": {"N": "-1"},
            **{f":{name}": serialize(v) for name, v in counters.items()},
        }
        if per_reason:
            update = (
                f"SET {per_reason}.#reason = if_not_exists({per_reason}.#reason, :zero) + :one "
                + update
            )
            names["#reason"] = rejection_reason(reason)
            pool_values.update({":zero": {"N": "0"}, ":one": {"N": "1"}})
        record = "SET #s = :ended, ended_at = :now"
        record_values: dict[str, Any] = {
            ":ended": {"S": status.value},
            ":now": serialize(now),
            ":open": {"S": TicketState.OPEN.value},
            ":client": {"S": ticket.client_id},
            **values,
        }
        record_names = {"#s": "status"}
        if ":buffer" in values:
            record += ", #b = :buffer"
            record_names["#b"] = "buffer"
        if answer is not None:
            record += ", answer = :answer, outcome = :outcome"
            record_values[":answer"] = serialize(storable(answer.to_dict()))
            record_values[":outcome"] = {"S": answer.outcome.value}
        pool_update: dict[str, Any] = {
            "TableName": self._table,
            "Key": pool_key(e),
            "UpdateExpression": update,
            "ConditionExpression": "attribute_exists(next_ticket)",
            "ExpressionAttributeValues": pool_values,
        }
        if names:
            pool_update["ExpressionAttributeNames"] = names
        items: list[Any] = [
            {
                "Update": {
                    "TableName": self._table,
                    "Key": ticket_key(e, ticket.number),
                    "UpdateExpression": record,
                    "ConditionExpression": f"#s = :open AND client_id = :client{condition}",
                    "ExpressionAttributeNames": record_names,
                    "ExpressionAttributeValues": record_values,
                }
            },
            {
                "Delete": {
                    "TableName": self._table,
                    "Key": training_key(e, ticket.number),
                    "ConditionExpression": "client_id = :client",
                    "ExpressionAttributeValues": {":client": {"S": ticket.client_id}},
                }
            },
            {"Update": pool_update},
            *extra,
        ]
        return self._transact(items)

    def record_answer(
        self,
        ticket: Ticket,
        answer: Answer,
        *,
        now: float,
        buffer: int | None = None,
        buffer_base: int = 0,
        buffer_size: int = 0,
        handling_seconds: float = 0.0,
    ) -> AnswerOutcome:
        """Record an OPEN ticket's one answer. An accepted one joins buffer ``buffer`` in the
        same transaction, only while it has room (the buffer is made by the first update
        that joins it, with its base version and size): ``BUFFER_FULL`` when it had none.
        ``ENDED`` when the ticket was answered or expired before (the ticket as it is).
        The pool counts the answer's bytes and the averager's ``handling_seconds`` with it."""
        accepted = answer.outcome is Outcome.ACCEPTED
        if accepted and buffer is None:
            raise ValueError("an accepted answer joins a buffer")
        declined = answer.outcome is Outcome.DECLINED
        counters: dict[str, int | float] = {
            "answered": 1,
            "accepted": int(accepted),
            "rejected": int(not accepted and not declined),
            "declined": int(declined),
            "answer_bytes": max(0, int(answer.size)),
            "handling_seconds": max(0.0, round(handling_seconds, 6)),
        }
        extra: list[Any] = []
        values: dict[str, Any] = {}
        condition = ""
        if accepted and buffer is not None:
            e = ticket.experiment
            values[":buffer"] = {"N": str(buffer)}
            extra = [
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": buffer_key(e, buffer),
                        "UpdateExpression": (
                            "SET buffer_of = :e, "
                            "base_version = if_not_exists(base_version, :base), "
                            "#k = if_not_exists(#k, :size), #s = if_not_exists(#s, :filling), "
                            "created_at = if_not_exists(created_at, :now) ADD #c :one"
                        ),
                        "ConditionExpression": (
                            "attribute_not_exists(#c) OR (#c < #k AND #s = :filling)"
                        ),
                        "ExpressionAttributeNames": {"#s": "status", "#c": "count", "#k": "size"},
                        "ExpressionAttributeValues": {
                            ":e": {"S": e},
                            ":base": {"N": str(buffer_base)},
                            ":size": {"N": str(buffer_size)},
                            ":filling": {"S": BufferState.FILLING.value},
                            ":now": serialize(now),
                            ":one": {"N": "1"},
                        },
                    }
                },
                {
                    "Put": {
                        "TableName": self._table,
                        "Item": {
                            **_key(member_partition(e, buffer), ticket.number),
                            **to_item(
                                {
                                    "client_id": ticket.client_id,
                                    "base_version": ticket.base_version,
                                    "answer": storable(answer.to_dict()),
                                    "expires_at": int(now + TICKET_RETENTION_SECONDS),
                                }
                            ),
                        },
                        "ConditionExpression": "attribute_not_exists(client_id)",
                    }
                },
            ]
        status = TicketState.ANSWERED
        record_extra = {":buffer": values[":buffer"]} if values else {}
        written = self._end(
            ticket,
            status=status,
            counters=counters,
            answer=answer,
            condition=condition,
            values=record_extra,
            now=now,
            extra=extra,
            reason=answer.reason,
            per_reason="" if accepted else ("answer_declines" if declined else "answer_rejections"),
        )
        if written:
            return AnswerOutcome(AnswerResult.RECORDED, None)
        current = self.ticket(ticket.experiment, ticket.number)
        if current is None:
            return AnswerOutcome(AnswerResult.NO_SUCH_TICKET, None)
        if current.status is not TicketState.OPEN:
            return AnswerOutcome(AnswerResult.ENDED, current)
        if accepted:
            return AnswerOutcome(AnswerResult.BUFFER_FULL, current)
        raise RuntimeError(f"ticket {ticket.number}'s answer was refused while it is open")

    def expire(self, ticket: Ticket, now: float) -> bool:
        """OPEN -> EXPIRED for a ticket whose lease passed; frees its place. One caller wins."""
        return self._end(
            ticket,
            status=TicketState.EXPIRED,
            counters={"expired": 1},
            answer=None,
            condition=" AND deadline_at < :now",
            values={},
            now=now,
        )

    # --- buffers --------------------------------------------------------------------------

    def begin_step(
        self, experiment: str, number: int, base_version: int, owner: str, now: float, lease: float
    ) -> Buffer | None:
        """A full buffer FILLING -> AGGREGATING under a lease, or an expired lease taken over,
        only when the pool's version is the buffer's base (buffers step in order). The one
        winner gets the buffer back; everyone else None."""
        written = self._transact(
            [
                {
                    "ConditionCheck": {
                        "TableName": self._table,
                        "Key": pool_key(experiment),
                        "ConditionExpression": "version = :base",
                        "ExpressionAttributeValues": {":base": {"N": str(base_version)}},
                    }
                },
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": buffer_key(experiment, number),
                        "UpdateExpression": (
                            "SET #s = :aggregating, lease_owner = :owner, "
                            "lease_expires_at = :expires ADD attempts :one"
                        ),
                        "ConditionExpression": (
                            "#c >= #k AND base_version = :base AND (#s = :filling OR "
                            "(#s = :aggregating AND lease_expires_at < :now))"
                        ),
                        "ExpressionAttributeNames": {"#s": "status", "#c": "count", "#k": "size"},
                        "ExpressionAttributeValues": {
                            ":aggregating": {"S": BufferState.AGGREGATING.value},
                            ":filling": {"S": BufferState.FILLING.value},
                            ":owner": {"S": owner},
                            ":expires": serialize(now + lease),
                            ":now": serialize(now),
                            ":base": {"N": str(base_version)},
                            ":one": {"N": "1"},
                        },
                    }
                },
            ]
        )
        return self.buffer(experiment, number) if written else None

    def close(
        self,
        buffer: Buffer,
        owner: str,
        now: float,
        summary: Mapping[str, Any],
    ) -> bool:
        """AGGREGATING -> CLOSED by the lease holder, in the transaction that moves the pool's
        version from the buffer's base to the version it made."""
        e = buffer.experiment
        return self._transact(
            [
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": buffer_key(e, buffer.number),
                        "UpdateExpression": (
                            "SET #s = :closed, model_version = :v, finished_at = :now, "
                            "summary = :summary REMOVE lease_owner, lease_expires_at"
                        ),
                        "ConditionExpression": "#s = :aggregating AND lease_owner = :owner",
                        "ExpressionAttributeNames": {"#s": "status"},
                        "ExpressionAttributeValues": {
                            ":closed": {"S": BufferState.CLOSED.value},
                            ":aggregating": {"S": BufferState.AGGREGATING.value},
                            ":owner": {"S": owner},
                            ":v": {"N": str(buffer.version)},
                            ":now": serialize(now),
                            ":summary": serialize(storable(dict(summary))),
                        },
                    }
                },
                {
                    "Update": {
                        "TableName": self._table,
                        "Key": pool_key(e),
                        "UpdateExpression": "SET version = :v",
                        "ConditionExpression": "version = :base",
                        "ExpressionAttributeValues": {
                            ":v": {"N": str(buffer.version)},
                            ":base": {"N": str(buffer.base_version)},
                        },
                    }
                },
            ]
        )
