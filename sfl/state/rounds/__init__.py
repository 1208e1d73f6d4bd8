"""Round records and their transitions: OPEN -> AGGREGATING -> CLOSED, or -> ABANDONED.

Every transition is one DynamoDB conditional write, so concurrent initiators and
averagers agree without locks: at most one round is open, each client answers a round
once, and exactly one aggregation wins (with a lease, so a crashed one is retried).

A round of any size: the round item holds only bounded fields and atomic counters; each
selected client has its own *slot* item (its answer, once it answered), in the same table
under the partition ``<experiment>#slots#<round>``, read with a paginated query. An answer
is one transaction: the slot gets the answer and the round item's counters grow, or neither
(docs/scale.md).

``records``: the round, its state, slots and answers as plain data (no AWS call);
``keys``: where a round and its slots live in the table; ``store``: ``RoundStore``, every
read and write.
"""

from __future__ import annotations

from sfl.state.rounds.keys import slot_partition
from sfl.state.rounds.records import Answer, Outcome, RecordResult, Round, RoundState, storable
from sfl.state.rounds.store import SLOT_WRITE_GRACE_SECONDS, RoundOutcome, RoundRefusals, RoundStore

__all__ = [
    "SLOT_WRITE_GRACE_SECONDS",
    "Answer",
    "Outcome",
    "RecordResult",
    "Round",
    "RoundOutcome",
    "RoundRefusals",
    "RoundState",
    "RoundStore",
    "slot_partition",
    "storable",
]
