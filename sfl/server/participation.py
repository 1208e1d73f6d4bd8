"""The clients' server-side records: each round a selected client answered or missed, folded
into its registry item (turnaround EWMA, answered / missed, recent picks, the accepted
update's bounded utility), which selection reads. Best effort: the registry is advisory,
the round record is the truth.

A decline (``sfl.core.decline``) counts as a miss, with the whole round as its turnaround,
exactly as silence or a rejected update does: the round gained nothing from the device, so
selection and benching (``missed_streak``) treat it the same. What a decline changes is the
round, not the device's standing: the round stops waiting for it. So declining can neither
stall a round (it closes sooner) nor spare a device the consequences of giving nothing, and
an honest device with no data is benched like a silent one until it has some.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sfl.state.registry import statistical_utility
from sfl.state.rounds import Answer, Outcome, Round

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext

logger = logging.getLogger(__name__)


def count_answer(ctx: AveragerContext, round_: Round, client: str, answer: Answer | None) -> None:
    """Fold this round into the client's record: answered if ``answer`` was accepted, else
    missed (a rejection, a decline, or ``None``: no answer by the round's end)."""
    answered = answer is not None and answer.outcome is Outcome.ACCEPTED
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
        )
    except Exception as e:  # never let bookkeeping fail an update or a round
        logger.warning(
            "client registry not updated",
            extra={"client_id": client, "round": round_.round, "error": type(e).__name__},
        )


def count_missed(ctx: AveragerContext, finished: Round) -> None:
    """Selected clients that never answered missed this round. Called by the one invocation
    that finished it, so each is counted once; ``finished`` is loaded with its slots."""
    for client in finished.selected:
        if client not in finished.answers:
            count_answer(ctx, finished, client, None)
