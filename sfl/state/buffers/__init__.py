"""Buffered mode's state: a pool of tickets and the buffers their accepted updates fill.

Every pick of a device is a *ticket* (a number from the pool's counter, the version to start
from, a lease deadline); at most ``concurrency`` tickets are OPEN. A ticket ends once:
answered (its accepted update joins the buffer that is filling, in the same transaction) or
expired. Every ``size`` accepted updates fill a buffer, and each buffer becomes exactly one
model version, in order. The invariants are stated in docs/buffered.md.

``records``: the pool, tickets, buffers and members as plain data; ``store``: ``BufferStore``,
every read and write (items in the rounds table, partitions ``<experiment>#pool``,
``#tickets``, ``#training``, ``#buffers`` and ``#buffer#<n>``).
"""

from __future__ import annotations

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
from sfl.state.buffers.store import BufferStore

__all__ = [
    "AnswerOutcome",
    "AnswerResult",
    "Buffer",
    "BufferState",
    "BufferStore",
    "Member",
    "Pool",
    "Ticket",
    "TicketState",
]
