"""A closing round's estimated dollars (``sfl.core.cost``) from what it measured.

A listener of the round's close (``AveragerContext.on_closing``): its figure is stored with
the close, so history and reports read it as soon as the round is CLOSED.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sfl.core.cost import StackShape, figures_from_round, round_cost_summary

if TYPE_CHECKING:
    from sfl.server.context import Aggregated
    from sfl.state.rounds import Round

logger = logging.getLogger(__name__)


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
        return {"cost": {"usd": None, "unpriced": f"{type(e).__name__}: {e}"[:200]}}
