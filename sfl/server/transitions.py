"""Moving a round on: OPEN -> AGGREGATING at quorum (one winner, under a lease) -> CLOSED,
or ABANDONED past its hard deadline, with nothing acceptable, or after failed attempts.

Every transition is a conditional write on the round record (``sfl.state.rounds``), so the
invocations that try one at once have exactly one winner. The winner of a close asks the
round's closing listeners for their figures (its cost) and writes them with the close; the
invocation that finished a round deletes its update objects (``update_disposal``: nothing
reads them once the round is CLOSED or ABANDONED) and tells the finished listeners (scoring,
the next round).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from sfl.core.quorum import QuorumView, get_quorum_policy
from sfl.server import aggregation, liveness, update_disposal
from sfl.server.context import Aggregated
from sfl.server.participation import count_round
from sfl.state.rounds import Round, RoundState

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext

logger = logging.getLogger(__name__)

# An aggregation that failed this many times (crash, timeout) is not retried: the round is
# abandoned and the next one starts from the same model.
MAX_AGGREGATION_ATTEMPTS = 3


def quorum_view(ctx: AveragerContext, round_: Round) -> QuorumView:
    """The round's counts from its item's counters. Only past the soft deadline, with
    clients still silent, are their slots and registry records read: how many of them the
    round still waits for (``sfl.server.liveness``)."""
    view = QuorumView(
        selected=round_.num_selected,
        answered=round_.num_answered,
        accepted=round_.num_accepted,
        now=ctx.clock(),
        created_at=round_.created_at,
        soft_deadline_at=round_.soft_deadline_at or round_.deadline_at,
        deadline_at=round_.deadline_at,
    )
    if (
        round_.status is RoundState.OPEN
        and view.past_soft_deadline
        and not view.past_deadline
        and view.answered < view.selected
    ):
        return replace(view, awaited=liveness.awaited(ctx, round_))
    return view


def advance(ctx: AveragerContext, round_: Round) -> Round | None:
    """Move a round on if it can: aggregate at quorum, abandon past its deadline.

    Returns the finished round when this call finished it.
    """
    now = ctx.clock()
    if round_.status is RoundState.AGGREGATING:
        if round_.lease_expires_at >= now:
            return None  # someone holds the lease
        if round_.aggregation_attempts >= MAX_AGGREGATION_ATTEMPTS:
            reason = f"aggregation failed {round_.aggregation_attempts} times"
            if ctx.rounds.abandon_stuck(round_.experiment, round_.round, reason, now):
                return _finished(ctx, round_.round)
            return None
    elif round_.status is not RoundState.OPEN:
        return None
    view = quorum_view(ctx, round_)
    config = ctx.round_config(round_)
    quorum = get_quorum_policy(config.quorum)(view, config)
    if round_.status is RoundState.OPEN and not quorum:
        if view.past_deadline:
            reason = f"deadline passed with {view.answered} of {view.selected} answered"
            if ctx.rounds.abandon(round_.experiment, round_.round, reason, now):
                return _finished(ctx, round_.round)
        return None
    won = ctx.rounds.begin_aggregation(
        round_.experiment, round_.round, ctx.owner, now, config.aggregation_lease_seconds
    )
    if won is None:
        return None
    if not won.num_accepted:
        reason = "no acceptable update: every answer was rejected or declined"
        if ctx.rounds.abandon(won.experiment, won.round, reason, ctx.clock(), owner=ctx.owner):
            return _finished(ctx, won.round)
        return None
    if _aggregate_and_close(ctx, won):
        return _finished(ctx, won.round)
    return None


def _aggregate_and_close(ctx: AveragerContext, won: Round) -> bool:
    """The next model version from the round this call holds the lease of, then CLOSED with
    its figures (the closing listeners' with them); ABANDONED if no update could be read."""
    aggregated = aggregation.aggregate(ctx, won)
    if aggregated is None:
        aggregated = _written_before(ctx, won)
    if not isinstance(aggregated, Aggregated):  # None, or DP's refusal
        reason = aggregated or "no accepted update could be read back for aggregation"
        return ctx.rounds.abandon(won.experiment, won.round, reason, ctx.clock(), owner=ctx.owner)
    summary = dict(aggregated.summary)
    for listener in ctx.on_closing:
        summary.update(listener(won, aggregated))
    closed = ctx.rounds.close(
        won.experiment, won.round, ctx.owner, aggregated.version, aggregated.finished_at, summary
    )
    logger.info(
        "round aggregated",
        extra={
            "round": won.round,
            "model_version": aggregated.version,
            "closed": closed,
            **{k: v for k, v in summary.items() if k not in ("excluded", "clipped", "krum_kept")},
        },
    )
    return closed


def _written_before(ctx: AveragerContext, won: Round) -> Aggregated | None:
    """The round's version if an earlier attempt wrote it, though no update can be read now:
    that attempt stopped before the close, and the version stands (written once). Abandoning
    the round instead would leave the next round to make the same version, which it could not
    write."""
    version = won.base_version + 1
    if not ctx.models.has_model(version):
        return None
    logger.warning(
        "updates unreadable; closing with the version an earlier attempt wrote",
        extra={"round": won.round, "model_version": version},
    )
    summary = {
        "participants": won.num_accepted,
        "model_already_written": True,
        "figures_lost": "the updates were gone when this attempt read them",
    }
    return Aggregated(version, summary, ctx.clock(), stateful_rule=False)


def _finished(ctx: AveragerContext, number: int) -> Round | None:
    finished = ctx.rounds.get(ctx.config.experiment, number)
    if finished is not None:
        logger.info(
            "round finished",
            extra={
                "round": number,
                "status": str(finished.status),
                "reason": finished.abandon_reason,
            },
        )
        if finished.status in (RoundState.CLOSED, RoundState.ABANDONED):
            update_disposal.dispose_answers(ctx, finished.answers.values())
        count_round(ctx, finished)  # loaded from its slots, once per round
        for listener in ctx.on_finished:
            listener(finished)
    return finished
