"""Which of a round's silent clients it still waits for, past its soft deadline.

A client whose recent picks are at least half misses (``sfl.core.liveness.is_doubtful``) is
not waited for past the soft deadline: once every other client has answered, the quorum may
close (``sfl.core.quorum.only_doubtful_missing``). The history is the server's (counted when
rounds finish, never during one), so what the initiator judged at selection still holds. A
client with no readable record is waited for. Reads are bounded: with more silent clients
than ``MAX_DOUBT_READS`` the round waits for them all, as it did before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sfl.core.liveness import is_doubtful

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext
    from sfl.state.rounds import Round

# The most silent clients whose records one quorum check reads.
MAX_DOUBT_READS = 50


def awaited(ctx: AveragerContext, round_: Round) -> int:
    """How many of the round's silent clients it still waits for: those not doubtful (all of
    them past ``MAX_DOUBT_READS``). One query of the unanswered slots, one read per client."""
    silent = [
        slot.client_id
        for slot in ctx.rounds.slots(round_.experiment, round_.round, only="unanswered")
    ]
    if len(silent) > MAX_DOUBT_READS:
        return len(silent)
    window = ctx.round_config(round_).liveness_window
    waiting = 0
    for client in silent:
        record = ctx.registry.get(client)
        if record is None or not is_doubtful(record.miss_history, window):
            waiting += 1
    return waiting
