"""The scheduled watchdog: deadlines, quorum and lost leases first, then a bounded look for
updates whose S3 event never arrived.

Each part stands on its own: one bad object cannot stop the watchdog, and the round's
deadline is applied whatever happens to per-object work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.server import answers, transitions
from sfl.server.notifications import UpdateEvent
from sfl.state.rounds import Round, RoundState

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The tick looks for at most this many silent clients' uploads (one S3 LIST each): a round of
# 10,000 would otherwise cost 10,000 LISTs a tick. Which ones rotates from tick to tick, so
# every silent client is looked for within a few ticks even in the largest rounds.
MAX_RECOVERY_LOOKS = 1_000


@dataclass(frozen=True)
class TickOutcome:
    round: int | None
    status: str
    action: str
    details: dict[str, Any] = field(default_factory=dict)
    finished: Round | None = None


def tick(ctx: AveragerContext) -> TickOutcome:
    """Deadlines, quorum and lost leases first, then a look for updates whose S3 event never
    arrived. An update that lost its event and is only found after the hard deadline has
    passed without quorum is too late: the deadline came first."""
    latest = ctx.rounds.latest(ctx.config.experiment, slots=False)
    if latest is None:
        return TickOutcome(None, "", "no rounds yet")
    if latest.status.finished:
        return TickOutcome(latest.round, str(latest.status), "nothing to do")
    finished = transitions.advance(ctx, latest)
    if finished is not None:
        return TickOutcome(latest.round, str(finished.status), "finished", finished=finished)
    current = ctx.rounds.get(latest.experiment, latest.round, slots=False) or latest
    recovered: list[str] = []
    if current.status is RoundState.OPEN:
        recovered, finished = recover_lost_updates(ctx, current)
    if finished is not None:
        return TickOutcome(
            latest.round,
            str(finished.status),
            "finished",
            {"recovered": recovered},
            finished=finished,
        )
    return TickOutcome(latest.round, str(current.status), "waiting", {"recovered": recovered})


def recover_lost_updates(ctx: AveragerContext, round_: Round) -> tuple[list[str], Round | None]:
    """Find uploads whose S3 event never arrived: look for silent clients' keys, at most
    ``MAX_RECOVERY_LOOKS`` a tick, a different window of them each tick.

    Each object is handled on its own: judging it never raises (``sfl.server.answers``),
    and an AWS error on one object is logged against it while the look goes on. Returns
    what was found, and the round if handling one finished it."""
    recovered = []
    if round_.slots_loaded:
        silent = [c for c in round_.selected if c not in round_.answers]
    else:  # one paginated query of the slots still waiting
        waiting = ctx.rounds.slots(round_.experiment, round_.round, only="unanswered")
        silent = [s.client_id for s in waiting]
    for client in window(sorted(silent), MAX_RECOVERY_LOOKS, int(ctx.clock())):
        key = layout.update_key(client, round_.round)
        try:
            listing = ctx.s3.list_objects_v2(Bucket=ctx.names.updates_bucket, Prefix=key, MaxKeys=1)
            found = [o for o in listing.get("Contents", []) if o["Key"] == key]
            if not found:
                continue
            obj = found[0]
            logger.warning(
                "update found without its S3 event",
                extra={"round": round_.round, "client_id": client, "key": key},
            )
            event = UpdateEvent(
                bucket=ctx.names.updates_bucket,
                key=key,
                size=int(obj["Size"]),
                etag=str(obj.get("ETag", "")),
                uploaded_at=obj["LastModified"].timestamp(),
            )
            outcome = answers.handle_update(ctx, event)
        except ClientError as e:
            logger.exception(
                "recovering an update failed",
                extra={"round": round_.round, "client_id": client, "key": key},
            )
            recovered.append(f"{client}:failed:{type(e).__name__}")
            continue
        recovered.append(f"{client}:{outcome.result}")
        if outcome.finished is not None:
            return recovered, outcome.finished
    return recovered, None


def window(items: list[T], size: int, turn: int) -> list[T]:
    """``size`` consecutive items (wrapping around) from a start that moves with ``turn``:
    all of them when they fit."""
    if len(items) <= size:
        return items
    start = (turn * size) % len(items)
    return (items + items)[start : start + size]
