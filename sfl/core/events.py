"""Lambda event shapes: S3 notifications (keys URL-encoded) and our own control events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

TICK = "tick"
BOOTSTRAP = "bootstrap"


@dataclass(frozen=True)
class UpdateEvent:
    """One uploaded object, from an S3 event record (key already URL-decoded).

    ``uploaded_at``: when S3 stored it (the record's ``eventTime``, or ``LastModified`` for an
    update found by listing), epoch seconds; set by S3, never by the client. None if unknown.
    """

    bucket: str
    key: str
    size: int
    etag: str = ""
    uploaded_at: float | None = None


def control_action(event: Mapping[str, Any]) -> str | None:
    """``{"sfl": "tick"}`` / ``{"sfl": "bootstrap"}``; an EventBridge scheduled event is a tick."""
    action = event.get("sfl")
    if isinstance(action, str):
        return action
    if event.get("detail-type") == "Scheduled Event":
        return TICK
    return None


def s3_updates(event: Mapping[str, Any]) -> list[UpdateEvent]:
    """The ObjectCreated records of an S3 notification, keys decoded (``+`` is a space)."""
    updates = []
    for record in event.get("Records", []):
        if record.get("eventSource") != "aws:s3":
            continue
        if not str(record.get("eventName", "")).startswith("ObjectCreated"):
            continue
        s3 = record["s3"]
        updates.append(
            UpdateEvent(
                bucket=s3["bucket"]["name"],
                key=unquote_plus(s3["object"]["key"]),
                size=int(s3["object"].get("size", 0)),
                etag=str(s3["object"].get("eTag", "")),
                uploaded_at=_epoch(record.get("eventTime")),
            )
        )
    return updates


def _epoch(timestamp: Any) -> float | None:
    """An S3 record's ISO 8601 ``eventTime`` (``2026-11-28T04:31:54.217Z``) as epoch seconds."""
    if not isinstance(timestamp, str):
        return None
    try:
        parsed = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None
