"""Moving buffered mode on: each full buffer, in order, becomes exactly one model version.

A buffer is stepped only when the version before it exists (the pool's version is its base),
by the one invocation that wins its lease (``BufferStore.begin_step``); a lease that expired
(a crash, a timeout) is taken over by the next caller, the watchdog's tick among them. The
step writes the version once (``If-None-Match``) and the close moves the pool's version on in
the same transaction, so a retry finds the version and keeps it. After ``MAX_STEP_ATTEMPTS``
failed attempts, or with no update readable, the buffer still makes its version: the current
model written again, with the reason in the buffer's summary, so versions stay contiguous
and no buffer waits forever. The closing listeners' figures (its cost, ``sfl.server.pricing``)
are written with the close.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sfl.learning.codec import encode_model
from sfl.learning.rules.aggregation import AggregationError
from sfl.server import buffer_step, update_disposal
from sfl.server.base_model import base_model
from sfl.state.buffers import Buffer, BufferState

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext

logger = logging.getLogger(__name__)

# A buffer whose step failed this many times (crash, timeout) makes its version unchanged.
MAX_STEP_ATTEMPTS = 3


def advance(ctx: AveragerContext) -> list[Buffer]:
    """Step every full buffer whose turn it is, in order; the buffers this call closed."""
    closed: list[Buffer] = []
    experiment = ctx.config.experiment
    while True:
        pool = ctx.buffers.pool(experiment)
        if pool is None:
            return closed
        buffer = ctx.buffers.buffer(experiment, pool.next_buffer)
        if buffer is None or not buffer.full:
            return closed
        now = ctx.clock()
        if buffer.status is BufferState.AGGREGATING and buffer.lease_expires_at >= now:
            return closed  # someone holds the lease
        won = ctx.buffers.begin_step(
            experiment,
            buffer.number,
            pool.version,
            ctx.owner,
            now,
            ctx.config.aggregation_lease_seconds,
        )
        if won is None:
            return closed
        summary = _make_version(ctx, won)
        for figures in ctx.on_version_closing:  # its cost: stored with the close
            summary.update(figures(ctx, won, summary))
        if not ctx.buffers.close(won, ctx.owner, ctx.clock(), summary):
            return closed  # the lease was taken over meanwhile: the new holder closes it
        # The version is written and the pool has moved past this buffer: its updates are
        # read by nobody again (sfl.server.update_disposal).
        update_disposal.dispose_buffer(ctx, experiment, won.number)
        done = ctx.buffers.buffer(experiment, won.number) or won
        logger.info(
            "buffer stepped",
            extra={
                "buffer": won.number,
                "model_version": won.version,
                "participants": summary.get("participants"),
            },
        )
        closed.append(done)
        for listener in ctx.on_version:
            listener(done)


def _make_version(ctx: AveragerContext, won: Buffer) -> dict[str, object]:
    """The buffer's version written (by the step, or unchanged with the reason); its summary."""
    if won.attempts > MAX_STEP_ATTEMPTS:
        return _unchanged(ctx, won, f"the step failed {won.attempts - 1} times")
    members = ctx.buffers.members(won.experiment, won.number)
    try:
        made = buffer_step.step(ctx, won, members)
    except AggregationError as e:  # the rule refuses these updates: a retry would too
        return _unchanged(ctx, won, f"the rule cannot step this buffer: {e}"[:500])
    if made is None:
        return _unchanged(ctx, won, "no accepted update could be read back")
    return made.summary


def _unchanged(ctx: AveragerContext, won: Buffer, reason: str) -> dict[str, object]:
    """The current model written again as the buffer's version (if no attempt wrote it)."""
    body = encode_model(
        base_model(ctx.models, won.base_version),
        version=won.version,
        buffer=won.number,
        participants=0,
    )
    kept = not ctx.models.put_model(won.version, body)
    logger.warning(
        "buffer made its version unchanged",
        extra={"buffer": won.number, "model_version": won.version, "reason": reason},
    )
    return {
        "participants": 0,
        "unchanged": reason,
        "model_already_written": kept,
        "model_bytes": len(body),
    }
