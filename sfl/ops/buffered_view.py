"""What the operator's commands show of buffered mode, as plain data: the pool (versions made,
devices training now, the filling buffer, answers per outcome) and the newest buffers with
the versions they made (docs/buffered.md). Bounded reads: the pool, the open tickets (at most
``concurrency``) and one page of the newest buffers."""

from __future__ import annotations

import statistics
import time
from typing import Any

from sfl.ops.federation import Federation
from sfl.state.buffers import Buffer, BufferState, BufferStore

#: The newest buffers ``status`` measures versions per hour and staleness over.
STATUS_BUFFERS = 50


def pool_status(fed: Federation, now: float | None = None) -> dict[str, Any] | None:
    """Buffered mode now; None before the initiator opened the pool."""
    now = time.time() if now is None else now
    store = BufferStore(fed.aws.dynamodb, fed.names.rounds_table)
    pool = store.pool(fed.experiment)
    if pool is None:
        return None
    training = store.training(fed.experiment)
    recent = store.recent_buffers(fed.experiment, STATUS_BUFFERS)
    filling = recent[-1] if recent and recent[-1].status is BufferState.FILLING else None
    made = [b for b in recent if b.status is BufferState.CLOSED and b.finished_at is not None]
    per_hour = None
    if len(made) >= 2:
        span = (made[-1].finished_at or 0.0) - (made[0].finished_at or 0.0)
        per_hour = 3600.0 * (len(made) - 1) / span if span > 0 else None
    staleness: dict[str, int] = {}
    for b in made:
        for tau, n in dict(b.summary.get("staleness", {})).items():
            staleness[str(tau)] = staleness.get(str(tau), 0) + int(n)
    return {
        "version": pool.version,
        "versions_made": pool.version - pool.start_version,
        "training": len(training),
        "concurrency": fed.deployed_config.concurrency,
        "oldest_ticket_seconds": now - min((t.created_at for t in training), default=now),
        "tickets_issued": pool.issued,
        "answered": pool.answered,
        "accepted": pool.accepted,
        "rejected": pool.rejected,
        "declined": pool.declined,
        "expired": pool.expired,
        "rejections": dict(pool.answer_rejections),
        "filling": None
        if filling is None
        else {"buffer": filling.number, "count": filling.count, "size": filling.size},
        "stepping": [b.number for b in recent if b.status is BufferState.AGGREGATING],
        "versions_per_hour": per_hour,
        "staleness": dict(sorted(staleness.items(), key=lambda kv: int(kv[0]))),
    }


def version_row(b: Buffer) -> dict[str, Any]:
    """One buffer and the version it made (or is making)."""
    summary = dict(b.summary)
    taus = [int(t) for t, n in dict(summary.get("staleness", {})).items() for _ in range(int(n))]
    return {
        "buffer": b.number,
        "status": str(b.status),
        "base_version": b.base_version,
        "model_version": b.model_version,
        "count": b.count,
        "size": b.size,
        "participants": summary.get("participants"),
        "staleness_mean": statistics.fmean(taus) if taus else None,
        "staleness_max": max(taus) if taus else None,
        "unchanged": summary.get("unchanged"),
        "started_at": b.created_at,
        "finished_at": b.finished_at,
        "attempts": b.attempts,
        "client_accuracy": summary.get("client_accuracy"),
    }


def recent_versions(fed: Federation, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` buffers, oldest first, as ``version_row``s."""
    store = BufferStore(fed.aws.dynamodb, fed.names.rounds_table)
    return [version_row(b) for b in store.recent_buffers(fed.experiment, count)]
