"""Buffered mode's scheduled watchdog: lost uploads, expired tickets, then buffers.

Each open ticket's upload is looked for first (its S3 event may have been lost; one LIST
each, at most ``MAX_RECOVERY_LOOKS`` a tick), so an update stored within its lease is
judged before the lease is declared over; then every ticket past its lease is expired,
freeing its place; then full buffers are stepped in order, an expired lease taken over.
Each part stands on its own: one bad object cannot stop the rest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.server import buffered_answers, buffered_steps
from sfl.server.notifications import UpdateEvent
from sfl.server.participation import count_ticket
from sfl.server.watchdog import MAX_RECOVERY_LOOKS, TickOutcome, window
from sfl.state.buffers import Ticket

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext

logger = logging.getLogger(__name__)


def tick(ctx: AveragerContext) -> TickOutcome:
    """Recover lost uploads, expire tickets past their lease, step full buffers."""
    experiment = ctx.config.experiment
    pool = ctx.buffers.pool(experiment)
    if pool is None:
        return TickOutcome(None, "", "no tickets yet")
    open_tickets = ctx.buffers.training(experiment)
    recovered = [
        found
        for ticket in window(open_tickets, MAX_RECOVERY_LOOKS, int(ctx.clock()))
        if (found := _recover(ctx, ticket))
    ]
    expired: list[int] = []
    now = ctx.clock()
    for ticket in ctx.buffers.training(experiment):
        if ticket.deadline_at < now and ctx.buffers.expire(ticket, now):
            logger.warning(
                "ticket expired",
                extra={"ticket": ticket.number, "client_id": ticket.client_id},
            )
            expired.append(ticket.number)
            count_ticket(ctx, ticket, None)
            for listener in ctx.on_place_freed:
                listener(ticket.number)
    closed = buffered_steps.advance(ctx)
    current = ctx.buffers.pool(experiment) or pool
    return TickOutcome(
        None,
        f"version {current.version}",
        "stepped" if closed else "waiting",
        {
            "recovered": recovered,
            "expired": expired,
            "versions": [b.version for b in closed],
            "training": current.training,
        },
    )


def _recover(ctx: AveragerContext, ticket: Ticket) -> str:
    """The ticket's upload handled if it is in the bucket without its event ("" if none)."""
    key = layout.update_key(ticket.client_id, ticket.number)
    try:
        listing = ctx.s3.list_objects_v2(Bucket=ctx.names.updates_bucket, Prefix=key, MaxKeys=1)
        found = [o for o in listing.get("Contents", []) if o["Key"] == key]
        if not found:
            return ""
        obj = found[0]
        logger.warning(
            "update found without its S3 event",
            extra={"ticket": ticket.number, "client_id": ticket.client_id, "key": key},
        )
        outcome = buffered_answers.handle_update(
            ctx,
            UpdateEvent(
                bucket=ctx.names.updates_bucket,
                key=key,
                size=int(obj["Size"]),
                etag=str(obj.get("ETag", "")),
                uploaded_at=obj["LastModified"].timestamp(),
            ),
        )
    except ClientError as e:
        logger.exception("recovering an update failed", extra={"ticket": ticket.number, "key": key})
        return f"{ticket.client_id}#{ticket.number}:failed:{type(e).__name__}"
    return f"{ticket.client_id}#{ticket.number}:{outcome.result}"
