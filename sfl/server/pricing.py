"""A closing round's or buffered version's estimated dollars (``sfl.core.cost``) from what it
measured.

Listeners of the close (``AveragerContext.on_closing``, ``on_version_closing``): the figure is
stored with the close, so history and reports read it as soon as the round or buffer is
CLOSED. Bookkeeping: a failure here never keeps a round from closing or a version from being
written; the figure then says why it has no dollars.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sfl.core.cost import (
    PoolCounts,
    StackShape,
    figures_from_round,
    figures_from_version,
    round_cost_summary,
    version_cost_summary,
)

if TYPE_CHECKING:
    from sfl.server.context import Aggregated, AveragerContext
    from sfl.state.buffers import Buffer
    from sfl.state.rounds import Round

logger = logging.getLogger(__name__)

#: The buffer summary's key for the pool's counts at its step: the next version is charged
#: with what was counted after them.
POOL_COUNTS_KEY = "pool_counts"


def price_round(round_: Round, aggregated: Aggregated) -> dict[str, Any]:
    """``{"cost": ...}`` for the round's summary. Downloads are counted as one model per
    selected device, not from the devices' own reports. Bookkeeping: a failure here never
    keeps a round from closing."""
    try:
        figures = figures_from_round(
            selected=round_.num_selected,
            accepted=round_.num_accepted,
            rejected=round_.num_rejected,
            other_rejections=sum(int(v) for v in round_.rejection_counts.values()),
            candidates=round_.candidates,
            summary={**aggregated.summary, "bytes_down": 0},
            select_seconds=round_.select_seconds,
            update_handling_seconds=round_.handling_seconds or None,
            stateful_rule=aggregated.stateful_rule,
        )
        return {"cost": round_cost_summary(figures, StackShape.from_environment())}
    except Exception as e:
        logger.warning("round cost not estimated", extra={"error": type(e).__name__})
        return {"cost": _unpriced(e)}


def price_version(
    ctx: AveragerContext, buffer: Buffer, summary: Mapping[str, Any]
) -> dict[str, Any]:
    """``{"pool_counts": ..., "cost": ...}`` for the buffer's summary: the version is charged
    with what the pool counted since the previous version's step (tickets and the ticketing
    runs that issued them, answers and their bytes, expiries: see docs/buffered.md, "Cost
    per version") and with its own step. Each ticket's device is counted as downloading the
    model once, not from the devices' own reports. Bookkeeping: a failure here never keeps a
    version from being written."""
    try:
        pool = ctx.buffers.pool(buffer.experiment)
        if pool is None:
            raise LookupError("the pool is gone")
        counts = pool.counts
    except Exception as e:
        logger.warning("version cost not estimated", extra={"error": type(e).__name__})
        return {"cost": _unpriced(e)}
    figures: dict[str, Any] = {POOL_COUNTS_KEY: counts.to_dict()}
    try:
        previous = _previous_counts(ctx, buffer)
        if previous is None:
            raise LookupError(
                f"buffer {buffer.number - 1} recorded no pool counts to count this version from"
            )
        version = figures_from_version(counts=counts, previous=previous, summary=summary)
        figures["cost"] = version_cost_summary(version, StackShape.from_environment())
    except Exception as e:
        logger.warning("version cost not estimated", extra={"error": type(e).__name__})
        figures["cost"] = _unpriced(e)
    return figures


def _previous_counts(ctx: AveragerContext, buffer: Buffer) -> PoolCounts | None:
    """The pool's counts at the previous version's step (none before the first buffer: the
    pool counts from zero); None if that buffer recorded none."""
    if buffer.number <= 1:
        return PoolCounts()
    previous = ctx.buffers.buffer(buffer.experiment, buffer.number - 1)
    recorded = previous.summary.get(POOL_COUNTS_KEY) if previous is not None else None
    return PoolCounts.from_dict(recorded) if isinstance(recorded, Mapping) else None


def _unpriced(e: Exception) -> dict[str, Any]:
    return {"usd": None, "unpriced": f"{type(e).__name__}: {e}"[:200]}
