"""The clients' server-side records: each finished round, every selected client answered or
missed, folded into its registry item (turnaround EWMA, answered / missed, the outcomes of
its recent picks, recent picks, the accepted update's bounded utility), which selection and
liveness read. Best effort: the registry is advisory, the round record is the truth.

Credit is given when the round is finished, not when an answer arrives: only then are the
round's changes known, and an accepted update whose change is negligible against the typical
change of recent rounds and this one (``sfl.core.credit``; kept in the registry table's
server-only ``#changes`` item) earns no turnaround sample and no utility: it counts as a miss, so
answering at once with the base model plus a trace buys no place in later rounds. The
invocation that finished the round counts it, once per client (the registry's write is
conditional on the round number, so a repeat counts nothing).

A decline (``sfl.core.decline``) counts as a miss, with the whole round as its turnaround,
exactly as silence or a rejected update does: the round gained nothing from the device, so
selection and benching (its recent misses, ``sfl.core.liveness``) treat it the same. What a
decline changes is the round, not the device's standing: the round stops waiting for it.
So declining can neither stall a round (it closes sooner) nor spare a device the
consequences of giving nothing, and an honest device with no data is benched like a silent
one until it has some.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sfl.core.credit import grown_pool, is_negligible, typical_change
from sfl.state.buffers import Ticket
from sfl.state.registry import statistical_utility
from sfl.state.rounds import Answer, Outcome, Round

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext

logger = logging.getLogger(__name__)


def earns_credit(answer: Answer | None, typical: float) -> bool:
    """An accepted update whose change is not negligible against the ``typical`` one."""
    return (
        answer is not None
        and answer.outcome is Outcome.ACCEPTED
        and not is_negligible(answer.delta_norm, typical)
    )


def count_answer(
    ctx: AveragerContext,
    round_: Round,
    client: str,
    answer: Answer | None,
    *,
    typical: float = 0.0,
) -> None:
    """Fold this round into the client's record: answered if ``answer`` was accepted and its
    change is not negligible against the round's ``typical`` one, else missed (a rejection,
    a decline, a negligible change, or ``None``: no answer by the round's end)."""
    answered = earns_credit(answer, typical)
    config = ctx.round_config(round_)
    utility = None
    if answer is not None and answered:
        turnaround = answer.received_at - round_.created_at
        utility = statistical_utility(answer.metrics, answer.num_examples, config.max_num_examples)
    else:
        turnaround = round_.deadline_at - round_.created_at
    try:
        ctx.registry.record_round(
            client,
            round_.round,
            answered=answered,
            turnaround=turnaround,
            b=config.ewma_b,
            utility=utility,
            pick_window=config.selection_window,
            now=ctx.clock(),
        )
    except Exception as e:  # never let bookkeeping fail an update or a round
        logger.warning(
            "client registry not updated",
            extra={"client_id": client, "round": round_.round, "error": type(e).__name__},
        )


def count_round(ctx: AveragerContext, finished: Round) -> None:
    """Count a finished round for every client it selected, against the typical change of
    recent rounds and this one (``sfl.core.credit``), then keep this round's credited
    changes for the next. Called by the one invocation that finished it; ``finished`` is
    loaded with its slots."""
    try:
        pool = ctx.registry.recent_changes()
    except Exception as e:  # bookkeeping: without a reference nothing is judged negligible
        logger.warning("recent changes not read", extra={"error": type(e).__name__})
        pool = ()
    typical = typical_change(pool, [a.delta_norm for a in finished.accepted.values()])
    credited = []
    for client in finished.selected:
        answer = finished.answers.get(client)
        count_answer(ctx, finished, client, answer, typical=typical)
        if answer is not None and earns_credit(answer, typical):
            credited.append(answer.delta_norm)
    try:
        ctx.registry.record_changes(finished.round, grown_pool(pool, credited))
    except Exception as e:
        logger.warning("recent changes not kept", extra={"error": type(e).__name__})


def count_ticket(ctx: AveragerContext, ticket: Ticket, answer: Answer | None) -> None:
    """Buffered mode: fold an ended ticket into its device's record as a round of its own
    (its number is the ticket's): answered with the server-measured turnaround if its update
    was accepted, else a miss over the whole lease (rejected, declined, or expired:
    ``answer`` None). No typical change to judge against yet: an accepted change counts."""
    answered = earns_credit(answer, 0.0)
    utility = None
    if answer is not None and answered:
        turnaround = answer.received_at - ticket.created_at
        utility = statistical_utility(
            answer.metrics, answer.num_examples, ctx.config.max_num_examples
        )
    else:
        turnaround = ticket.deadline_at - ticket.created_at
    try:
        ctx.registry.record_round(
            ticket.client_id,
            ticket.number,
            answered=answered,
            turnaround=max(0.0, turnaround),
            b=ctx.config.ewma_b,
            utility=utility,
            pick_window=ctx.config.selection_window,
            now=ctx.clock(),
        )
    except Exception as e:  # never let bookkeeping fail an update or a tick
        logger.warning(
            "client registry not updated",
            extra={
                "client_id": ticket.client_id,
                "ticket": ticket.number,
                "error": type(e).__name__,
            },
        )
