"""Deleting a finished round's (or a stepped buffer's) update objects from the updates bucket.

An individual update can be inverted into training examples, so none is kept once nothing will
read it again: once its round is CLOSED (its version written, the close committed, so no retry
aggregates it again) or ABANDONED, or its buffer's close committed. Every answer goes, accepted,
rejected, declined or unread alike: their bytes are equally the device's. Each object is deleted
only while it is the object that was answered (its ETag in the request: S3's conditional
delete), in ``DeleteObjects`` batches of at most 1,000 keys. Best effort: what fails is logged
and left to the bucket's lifecycle expiry, the backstop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from sfl.state.aws import error_code

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext
    from sfl.state.rounds import Answer

logger = logging.getLogger(__name__)

#: S3's limit on the keys of one DeleteObjects request.
DELETE_BATCH = 1000
# Errors that mean the answered object is not there any more: gone already, or replaced by a
# newer upload to the key (which is not ours to delete).
_ALREADY_GONE = frozenset({"NoSuchKey", "PreconditionFailed", "412", "404"})


@dataclass
class Disposal:
    """What one disposal did: objects deleted (or gone already), and keys whose delete failed."""

    deleted: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # key -> error code


def dispose_answers(ctx: AveragerContext, answers: Iterable[Answer]) -> Disposal:
    """Delete the update objects ``answers`` name (those with a key and an ETag)."""
    objects: dict[str, str] = {}
    for answer in answers:
        if answer.key and answer.etag:
            objects[answer.key] = answer.etag.strip('"')
    done = Disposal()
    keys = sorted(objects)
    for start in range(0, len(keys), DELETE_BATCH):
        batch = keys[start : start + DELETE_BATCH]
        try:
            response = ctx.s3.delete_objects(
                Bucket=ctx.names.updates_bucket,
                Delete={
                    "Objects": [{"Key": k, "ETag": f'"{objects[k]}"'} for k in batch],
                    "Quiet": True,
                },
            )
        except (ClientError, BotoCoreError) as e:
            failure = error_code(e) if isinstance(e, ClientError) else type(e).__name__
            done.failed.update(dict.fromkeys(batch, failure))
            continue
        errors = {str(e.get("Key", "")): str(e.get("Code", "")) for e in response.get("Errors", [])}
        for key in batch:
            code = errors.get(key)
            if code is None or code in _ALREADY_GONE:
                done.deleted += 1
            else:
                done.failed[key] = code
    if done.failed:
        logger.warning(
            "updates not deleted; the bucket's lifecycle will expire them",
            extra={"failed": len(done.failed), "errors": sorted(set(done.failed.values()))},
        )
    return done


def dispose_buffer(ctx: AveragerContext, experiment: str, number: int) -> Disposal:
    """Delete a closed buffer's members' update objects. Never raises: the buffer's close is
    committed, and what listens for it must still hear of it."""
    try:
        members = ctx.buffers.members(experiment, number)
    except (ClientError, BotoCoreError) as e:
        code = error_code(e) if isinstance(e, ClientError) else type(e).__name__
        logger.warning(
            "buffer's updates not deleted; the bucket's lifecycle will expire them",
            extra={"buffer": number, "error": code},
        )
        return Disposal(failed={f"<members of buffer {number}>": code})
    return dispose_answers(ctx, [m.answer for m in members])
