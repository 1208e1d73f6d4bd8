"""What buffered mode keeps, as plain records: the pool, a ticket, a buffer and its members.

Parsing to and from DynamoDB items lives here; no call to DynamoDB does (``BufferStore``'s
job). The protocol these records carry is stated in docs/buffered.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sfl.core import layout
from sfl.core.cost import PoolCounts
from sfl.state.dynamo import from_item
from sfl.state.rounds.records import Answer


class TicketState(enum.StrEnum):
    OPEN = "OPEN"  # the device may train and answer; it holds one of ``concurrency`` places
    ANSWERED = "ANSWERED"  # its one answer is recorded (accepted, rejected or declined)
    EXPIRED = "EXPIRED"  # its lease passed without an answer; the place was freed


class BufferState(enum.StrEnum):
    FILLING = "FILLING"  # takes accepted updates while count < size
    AGGREGATING = "AGGREGATING"  # full; one invocation holds the lease to make its version
    CLOSED = "CLOSED"  # its version is written and the pool's version moved to it


@dataclass(frozen=True)
class Pool:
    """The experiment's buffered state in one item: the ticket counter, the places taken,
    the newest version a buffer made, and counters that every ticket's end grows."""

    experiment: str
    next_ticket: int
    start_version: int  # the version buffered mode started from: buffer b makes start + b
    version: int  # the newest version a buffer made (start_version before the first)
    training: int = 0  # tickets OPEN now
    issued: int = 0
    answered: int = 0
    accepted: int = 0
    rejected: int = 0
    declined: int = 0
    expired: int = 0
    answer_rejections: Mapping[str, int] = field(default_factory=dict)
    answer_declines: Mapping[str, int] = field(default_factory=dict)
    created_at: float = 0.0
    # Every counter a version's cost is the difference of (``sfl.core.cost``): the issue
    # transaction grows the ticketing ones, an answer's transaction the answers' bytes and time.
    counts: PoolCounts = field(default_factory=PoolCounts)

    @property
    def next_buffer(self) -> int:
        """The buffer whose version comes next: buffers are stepped in order."""
        return self.version - self.start_version + 1

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Pool:
        d = from_item(item)
        return cls(
            experiment=str(d["pool_of"]),
            next_ticket=int(d["next_ticket"]),
            start_version=int(d["start_version"]),
            version=int(d["version"]),
            training=int(d.get("training", 0)),
            issued=int(d.get("issued", 0)),
            answered=int(d.get("answered", 0)),
            accepted=int(d.get("accepted", 0)),
            rejected=int(d.get("rejected", 0)),
            declined=int(d.get("declined", 0)),
            expired=int(d.get("expired", 0)),
            answer_rejections={k: int(v) for k, v in d.get("answer_rejections", {}).items()},
            answer_declines={k: int(v) for k, v in d.get("answer_declines", {}).items()},
            created_at=float(d.get("created_at", 0.0)),
            counts=PoolCounts.from_dict(d),
        )


@dataclass(frozen=True)
class Ticket:
    """One pick of one device: train from ``base_version`` and answer before ``deadline_at``
    under the upload key of round ``number``."""

    experiment: str
    number: int
    client_id: str
    base_version: int
    created_at: float
    deadline_at: float
    status: TicketState = TicketState.OPEN
    answer: Answer | None = None
    buffer: int | None = None  # the buffer its accepted update joined
    ended_at: float | None = None

    def assignment_entry(self) -> dict[str, Any]:
        """What the device reads of its ticket in the published assignment."""
        return {
            "client_id": self.client_id,
            "round": self.number,
            "base_version": self.base_version,
            "model_key": layout.model_key(self.base_version),
            "created_at": self.created_at,
            "deadline_at": self.deadline_at,
        }

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Ticket:
        d = from_item(item)
        answer = d.get("answer")
        buffer = d.get("buffer")
        ended = d.get("ended_at")
        return cls(
            experiment=str(d["ticket_of"]),
            number=int(d["round"]),
            client_id=str(d.get("client_id", "")),
            base_version=int(d["base_version"]),
            created_at=float(d["created_at"]),
            deadline_at=float(d["deadline_at"]),
            status=TicketState(d.get("status", TicketState.OPEN.value)),
            answer=Answer.from_dict(answer) if isinstance(answer, Mapping) else None,
            buffer=None if buffer is None else int(buffer),
            ended_at=None if ended is None else float(ended),
        )


@dataclass(frozen=True)
class Buffer:
    """Buffer ``number``: ``size`` accepted updates that become version ``base_version + 1``."""

    experiment: str
    number: int
    base_version: int
    size: int
    count: int
    status: BufferState
    lease_owner: str = ""
    lease_expires_at: float = 0.0
    attempts: int = 0
    model_version: int | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    finished_at: float | None = None

    @property
    def full(self) -> bool:
        return self.count >= self.size

    @property
    def version(self) -> int:
        """The version this buffer makes."""
        return self.base_version + 1

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Buffer:
        d = from_item(item)
        made = d.get("model_version")
        finished = d.get("finished_at")
        return cls(
            experiment=str(d["buffer_of"]),
            number=int(d["round"]),
            base_version=int(d["base_version"]),
            size=int(d["size"]),
            count=int(d.get("count", 0)),
            status=BufferState(d.get("status", BufferState.FILLING.value)),
            lease_owner=str(d.get("lease_owner", "")),
            lease_expires_at=float(d.get("lease_expires_at", 0.0)),
            attempts=int(d.get("attempts", 0)),
            model_version=None if made is None else int(made),
            summary=d.get("summary", {}),
            created_at=float(d.get("created_at", 0.0)),
            finished_at=None if finished is None else float(finished),
        )


@dataclass(frozen=True)
class Member:
    """An accepted update in a buffer: the ticket it answered and the version it started
    from (its staleness at the step is the buffer's base version less this)."""

    ticket: int
    client_id: str
    base_version: int
    answer: Answer

    @property
    def label(self) -> str:
        """How a step's summary names this update: a device may answer two tickets of one
        buffer, so its id alone would not do."""
        return f"{self.client_id}#{self.ticket}"

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Member:
        d = from_item(item)
        return cls(
            ticket=int(d["round"]),
            client_id=str(d["client_id"]),
            base_version=int(d["base_version"]),
            answer=Answer.from_dict(d["answer"]),
        )


class AnswerResult(enum.StrEnum):
    RECORDED = "recorded"
    BUFFER_FULL = "buffer_full"  # the buffer tried took its last update meanwhile: try the next
    ENDED = "ended"  # the ticket was answered or expired before
    NO_SUCH_TICKET = "no_such_ticket"


@dataclass(frozen=True)
class AnswerOutcome:
    result: AnswerResult
    ticket: Ticket | None  # not recorded: the ticket as it is now (ENDED: as it ended)
