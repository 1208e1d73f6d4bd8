"""Lambda event shapes: S3 notifications (keys URL-encoded) and our own control events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

TICK = "tick"
BOOTSTRAP = "bootstrap"


@dataclass(frozen=True)
class UpdateEvent:
    """One uploaded object, from an S3 event record (key already URL-decoded)."""

    bucket: str
    key: str
    size: int
    etag: str = ""


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
            )
        )
    return updates
