"""Uploads as the averager receives them: one ``UpdateEvent`` per object, from an S3
notification (Powertools' event data classes; keys URL-decoded) or, for an update whose
notification never came, from a listing (``sfl.server.watchdog``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aws_lambda_powertools.utilities.data_classes import S3Event


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


def s3_updates(event: Mapping[str, Any]) -> list[UpdateEvent]:
    """The ObjectCreated records of an S3 notification, keys decoded (``+`` is a space).

    S3's test event (sent when the notification is configured) has no records: no updates."""
    updates = []
    for record in S3Event(dict(event)).records if "Records" in event else ():
        if record.get("eventSource") != "aws:s3":
            continue
        if not str(record.get("eventName", "")).startswith("ObjectCreated"):
            continue
        obj = record.s3.get_object
        updates.append(
            UpdateEvent(
                bucket=record.s3.bucket.name,
                # Powertools decodes the first record's key: each record seen as an event of one.
                key=S3Event({"Records": [record.raw_event]}).object_key,
                size=int(obj.get("size") or 0),
                etag=obj.etag,
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
