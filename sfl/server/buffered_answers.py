"""An uploaded update's answer to its ticket (buffered mode): judged and recorded once.

The key names a ticket as it names a round today (``updates/<client>/round-<ticket>``). The
checks that need no download come first (a ticket of this client, OPEN, stored within its
lease), then the bytes are judged by every rule a round's update is
(``sfl.server.answers.judge``, against the ticket's own base version). An accepted update
joins the buffer that is filling, in the transaction that ends the ticket; one that would be
more than ``max_staleness`` versions behind that buffer's step is refused ``too_stale``.
Then full buffers are stepped in order (``sfl.server.buffered_steps``) and the freed place
is announced (the handler chains the initiator). Only AWS errors raise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from sfl.server import buffered_steps, update_disposal
from sfl.server.answers import (
    UpdateOutcome,
    UpdateResult,
    addressed,
    etag_of,
    judge,
    outside_window,
    refuse_other,
    unstorable,
)
from sfl.server.participation import count_ticket
from sfl.state.aws import error_code
from sfl.state.buffers import AnswerOutcome, AnswerResult, BufferState, Ticket, TicketState
from sfl.state.rounds import Answer, Outcome

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext
    from sfl.server.notifications import UpdateEvent

logger = logging.getLogger(__name__)

# An accepted update tries at most this many buffers (each try that finds its buffer full
# moves to the next one): more would mean buffers filling faster than a transaction.
MAX_BUFFER_TRIES = 64


def handle_update(ctx: AveragerContext, event: UpdateEvent) -> UpdateOutcome:
    """Judge and record one uploaded object against its ticket, then step full buffers."""
    key = addressed(ctx, event)
    if isinstance(key, UpdateOutcome):
        return key
    client, number = key.client_id, key.round
    ticket = ctx.buffers.ticket(ctx.config.experiment, number)
    if ticket is None:
        return refuse_other(ctx, number, event, client, "unknown_round", "no such ticket")
    if ticket.client_id != client:
        return refuse_other(
            ctx, number, event, client, "not_selected", "the ticket is another client's"
        )
    existing = ticket.answer
    if existing is not None and event.etag and existing.etag == etag_of(event.etag):
        logger.info("duplicate delivery ignored", extra={"ticket": number, "client_id": client})
        return _moved_on(ctx, UpdateOutcome(event.key, UpdateResult.DUPLICATE, "", client, number))
    if ticket.status is not TicketState.OPEN:
        return _ended(ctx, event, ticket)
    untimely = outside_window(
        event,
        ctx.clock(),
        ticket.created_at,
        ticket.deadline_at,
        began="the ticket was issued",
        ended="the ticket's lease ended",
    )
    if untimely is not None:
        return refuse_other(ctx, number, event, client, *untimely)
    judging = time.perf_counter()
    answer = judge(
        ctx,
        event,
        client,
        number=number,
        base_version=ticket.base_version,
        config=ctx.config,
        window_seconds=max(0.0, ticket.deadline_at - ticket.created_at),
    )
    if answer is None:
        return UpdateOutcome(event.key, UpdateResult.IGNORED, "object_missing", client, number)
    handled = time.perf_counter() - judging
    try:
        recorded, answer = record(ctx, ticket, answer, handling_seconds=handled)
    except ClientError as e:
        if error_code(e) != "ValidationException":
            raise
        recorded, answer = record(ctx, ticket, unstorable(answer, e), handling_seconds=handled)
    if recorded.result is AnswerResult.RECORDED:
        level = logging.WARNING if answer.outcome is Outcome.REJECTED else logging.INFO
        logger.log(
            level,
            f"update {answer.outcome.value}",
            extra={"ticket": number, "client_id": client, "reason": answer.reason},
        )
        count_ticket(ctx, ticket, answer)
        if answer.outcome is not Outcome.ACCEPTED:
            # In no buffer, so no step will read it: its bytes go now, not at expiry.
            update_disposal.dispose_answers(ctx, [answer])
        for listener in ctx.on_place_freed:
            listener(number)
        outcome = UpdateOutcome(
            event.key, UpdateResult(answer.outcome.value), answer.reason, client, number
        )
        return _moved_on(ctx, outcome)
    if recorded.ticket is not None:
        if recorded.ticket.answer is not None and recorded.ticket.answer.etag == answer.etag:
            return _moved_on(
                ctx, UpdateOutcome(event.key, UpdateResult.DUPLICATE, "", client, number)
            )
        return _ended(ctx, event, recorded.ticket, discard=False)
    return refuse_other(ctx, number, event, client, "unknown_round", "no such ticket")


def record(
    ctx: AveragerContext, ticket: Ticket, answer: Answer, *, handling_seconds: float = 0.0
) -> tuple[AnswerOutcome, Answer]:
    """Record the ticket's answer; an accepted one joins the filling buffer, or is refused
    ``too_stale`` if that buffer's step is more than ``max_staleness`` versions past the
    ticket's base. Returns the outcome and the answer as recorded (the pool counts the
    ``handling_seconds`` judging it took with it)."""
    store, experiment = ctx.buffers, ctx.config.experiment
    now = ctx.clock()
    if answer.outcome is not Outcome.ACCEPTED:
        return store.record_answer(
            ticket, answer, now=now, handling_seconds=handling_seconds
        ), answer
    for _ in range(MAX_BUFFER_TRIES):
        pool = store.pool(experiment)
        if pool is None:
            raise RuntimeError("the pool vanished under an open ticket")
        newest = store.newest_buffer(experiment)
        if newest is None:
            number = pool.next_buffer
        elif newest.count < newest.size and newest.status is BufferState.FILLING:
            number = newest.number
        else:
            number = newest.number + 1
        base = pool.start_version + number - 1
        behind = base - ticket.base_version
        if behind > ctx.config.max_staleness:
            stale = replace(
                answer,
                outcome=Outcome.REJECTED,
                reason=(
                    f"too_stale: trained from version {ticket.base_version}, {behind} versions "
                    f"behind the step it would join (max_staleness={ctx.config.max_staleness})"
                ),
            )
            return store.record_answer(
                ticket, stale, now=now, handling_seconds=handling_seconds
            ), stale
        outcome = store.record_answer(
            ticket,
            answer,
            now=now,
            buffer=number,
            buffer_base=base,
            buffer_size=ctx.config.buffer_size,
            handling_seconds=handling_seconds,
        )
        if outcome.result is not AnswerResult.BUFFER_FULL:
            return outcome, answer
    raise RuntimeError(
        f"no buffer took ticket {ticket.number}'s update in {MAX_BUFFER_TRIES} tries"
    )


def _ended(
    ctx: AveragerContext, event: UpdateEvent, ticket: Ticket, *, discard: bool = True
) -> UpdateOutcome:
    if ticket.status is TicketState.ANSWERED:
        return refuse_other(
            ctx,
            ticket.number,
            event,
            ticket.client_id,
            "duplicate",
            "client already answered this ticket",
            discard=discard,
        )
    return refuse_other(
        ctx,
        ticket.number,
        event,
        ticket.client_id,
        "round_not_open",
        f"ticket is {ticket.status}",
        discard=discard,
    )


def _moved_on(ctx: AveragerContext, outcome: UpdateOutcome) -> UpdateOutcome:
    """An answer may fill a buffer: step the full ones whose turn it is."""
    buffered_steps.advance(ctx)
    return outcome
