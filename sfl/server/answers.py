"""An uploaded update's answer to its round: judged and recorded once, then the round moved on.

Checks that need only the round record come first (a known round, a selected client that
has not answered, the round OPEN, stored within the round's time), then the object is read
and judged (``sfl.server.acceptance``) and the answer recorded with a conditional write, so a
duplicated event is a no-op and a client answers a round once. A selected client's first
upload is its answer, recorded with a stable reason if refused; any other upload (not
selected, answered already, too early or late) is refused with a log line and a metric and
writes nothing, so a flood of them costs two reads each and never loads the round item.
Only AWS errors raise (the event is retried). A decline
(``sfl.core.decline``) at the client's update key is judged by the same checks and recorded
as its answer: declined, with its reason, no weight; the quorum counts it as answered.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.learning.compression import UpdateCodec
from sfl.server import transitions
from sfl.server.acceptance import (
    Expected,
    UpdateRejected,
    check_size,
    read_decline,
    validate_update,
)
from sfl.server.base_model import base_model
from sfl.state.aws import error_code, is_not_found, is_transient
from sfl.state.rounds import Answer, Outcome, RecordResult, Round, RoundState

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext
    from sfl.server.notifications import UpdateEvent

logger = logging.getLogger(__name__)

# How far S3's clock (event times) and the functions' clocks may disagree.
CLOCK_TOLERANCE_SECONDS = 1.0


class UpdateResult(enum.StrEnum):
    """What handling one uploaded object came to: the answer recorded for it (``ACCEPTED``,
    ``REJECTED``: the values of ``sfl.state.rounds.Outcome``) or why it needed none."""

    ACCEPTED = Outcome.ACCEPTED.value
    REJECTED = Outcome.REJECTED.value
    DECLINED = Outcome.DECLINED.value
    DUPLICATE = "duplicate"  # the same object delivered again: its answer stands
    IGNORED = "ignored"  # not an update for this function (another bucket, or gone)


@dataclass(frozen=True)
class UpdateOutcome:
    key: str
    result: UpdateResult
    reason: str = ""
    client_id: str = ""
    round: int | None = None
    finished_round: int | None = None
    finished: Round | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "") and k != "finished"}


def addressed(ctx: AveragerContext, event: UpdateEvent) -> layout.UpdateKey | UpdateOutcome:
    """The client and round (or ticket) an upload's key names, or the outcome that ends it
    there: a malformed key is refused (and the object deleted), another bucket's ignored.
    Both modes' ``handle_update`` start here."""
    try:
        key = layout.parse_update_key(event.key)
    except layout.MalformedKeyError as e:
        logger.warning(
            "update rejected",
            extra={"key": event.key, "reason": "malformed_key", "detail": str(e)},
        )
        discard_refused(ctx, event)
        return UpdateOutcome(event.key, UpdateResult.REJECTED, "malformed_key")
    if event.bucket != ctx.names.updates_bucket:
        logger.warning("update ignored", extra={"key": event.key, "bucket": event.bucket})
        return UpdateOutcome(event.key, UpdateResult.IGNORED, "wrong_bucket")
    return key


def handle_update(ctx: AveragerContext, event: UpdateEvent) -> UpdateOutcome:
    """Judge and record one uploaded object, then move its round on if the answer lets it."""
    key = addressed(ctx, event)
    if isinstance(key, UpdateOutcome):
        return key
    client, number = key.client_id, key.round
    log = {"round": number, "client_id": client, "key": event.key}
    # O(1) whatever the round's size: the round item (counters) and this client's slot.
    round_ = ctx.rounds.get(ctx.config.experiment, number, slots=False)
    if round_ is None:
        logger.warning("update rejected", extra={**log, "reason": "unknown_round"})
        discard_refused(ctx, event)
        return UpdateOutcome(event.key, UpdateResult.REJECTED, "unknown_round", client, number)

    slot = ctx.rounds.slot(ctx.config.experiment, number, client)
    existing = slot.answer if slot is not None else None
    if existing is not None and event.etag and existing.etag == etag_of(event.etag):
        logger.info("duplicate delivery ignored", extra=log)
        return _after_answer(
            ctx, round_, UpdateOutcome(event.key, UpdateResult.DUPLICATE, "", client, number)
        )
    if slot is None:
        return _reject_other(
            ctx, round_, event, client, "not_selected", "client was not selected for this round"
        )
    if existing is not None:
        return _reject_other(
            ctx, round_, event, client, "duplicate", "client already answered this round"
        )
    if round_.status is not RoundState.OPEN:
        return _reject_other(
            ctx, round_, event, client, "round_not_open", f"round is {round_.status}"
        )
    untimely = outside_window(
        event,
        ctx.clock(),
        round_.created_at,
        round_.deadline_at,
        began="the round started",
        ended="the round's hard deadline",
    )
    if untimely is not None:
        return _reject_other(ctx, round_, event, client, *untimely)

    judging = time.perf_counter()
    answer = _judge(ctx, round_, event, client)
    if answer is None:  # the object is gone (deleted before we got to it)
        return UpdateOutcome(event.key, UpdateResult.IGNORED, "object_missing", client, number)
    handled = time.perf_counter() - judging
    try:
        recorded = ctx.rounds.record_answer(
            ctx.config.experiment, number, client, answer, handling_seconds=handled
        )
    except ClientError as e:
        if error_code(e) != "ValidationException":
            raise
        answer = unstorable(answer, e)
        recorded = ctx.rounds.record_answer(
            ctx.config.experiment, number, client, answer, handling_seconds=handled
        )
    if recorded.result is RecordResult.RECORDED and recorded.round is not None:
        # The client's registry record is credited when the round finishes
        # (sfl.server.participation), against the round's changes.
        level = logging.WARNING if answer.outcome is Outcome.REJECTED else logging.INFO
        logger.log(level, f"update {answer.outcome.value}", extra={**log, "reason": answer.reason})
        result = UpdateResult(answer.outcome.value)
        outcome = UpdateOutcome(event.key, result, answer.reason, client, number)
        return _after_answer(ctx, recorded.round, outcome)
    current = recorded.round or round_
    if recorded.result is RecordResult.ALREADY_ANSWERED:
        if recorded.answer is not None and recorded.answer.etag == answer.etag:
            return _after_answer(
                ctx, current, UpdateOutcome(event.key, UpdateResult.DUPLICATE, "", client, number)
            )
        # Raced with another delivery of this key: the object may be the one it recorded.
        return _reject_other(
            ctx,
            current,
            event,
            client,
            "duplicate",
            "client already answered this round",
            discard=False,
        )
    if recorded.result is RecordResult.NOT_SELECTED:
        return _reject_other(
            ctx, current, event, client, "not_selected", "client was not selected for this round"
        )
    return _reject_other(
        ctx, current, event, client, "round_not_open", f"round is {current.status}"
    )


def outside_window(
    event: UpdateEvent,
    now: float,
    opened_at: float,
    deadline_at: float,
    *,
    began: str,
    ended: str,
) -> tuple[str, str] | None:
    """Why an upload stored outside its round's (or ticket's) time is refused, as (reason,
    detail), or None. Keys are predictable: an object stored before the round existed was
    not trained from its model, and would claim a turnaround of zero. Past the deadline, a
    round is still OPEN only because no tick has ended it yet: when S3 stored the update, not
    when it is processed (a retried or recovered event comes later), decides."""
    arrived_at = arrival(event, now)
    if arrived_at < opened_at - CLOCK_TOLERANCE_SECONDS:
        return "before_round", f"stored {opened_at - arrived_at:.1f} s before {began}"
    if arrived_at > deadline_at:
        return "past_deadline", f"stored {arrived_at - deadline_at:.1f} s after {ended}"
    return None


def unstorable(answer: Answer, error: ClientError) -> Answer:
    """The answer recorded in place of one DynamoDB refused to store (what we derived from
    the update, its figures): rejected, with DynamoDB's reason."""
    return Answer(
        outcome=Outcome.REJECTED,
        key=answer.key,
        etag=answer.etag,
        size=answer.size,
        received_at=answer.received_at,
        reason=f"unstorable: {str(error)[:200]}",
    )


def _judge(ctx: AveragerContext, round_: Round, event: UpdateEvent, client: str) -> Answer | None:
    """Download and validate one update (or decline) to a round."""
    return judge(
        ctx,
        event,
        client,
        number=round_.round,
        base_version=round_.base_version,
        config=ctx.round_config(round_),
        window_seconds=max(0.0, round_.deadline_at - round_.created_at),
    )


def judge(
    ctx: AveragerContext,
    event: UpdateEvent,
    client: str,
    *,
    number: int,
    base_version: int,
    config: FederationConfig,
    window_seconds: float,
) -> Answer | None:
    """Download and validate one update (or decline) that answers round (or ticket)
    ``number`` from ``base_version``; an Answer either way (None if it vanished).

    AWS errors propagate (the event is retried); anything else that goes wrong while
    judging these bytes, including a bug of ours, rejects this one update only."""
    received_at = arrival(event, ctx.clock())
    common: dict[str, Any] = {"key": event.key, "size": event.size, "received_at": received_at}
    try:
        expected = Expected(
            round=number,
            client_id=client,
            base_version=base_version,
            base_header=ctx.models.header(base_version),
            max_bytes=config.max_update_bytes,
            max_num_examples=config.max_num_examples,
            codec=UpdateCodec.from_config(config),
        )
        check_size(event.size, expected.size_limit)
        try:
            obj = ctx.s3.get_object(Bucket=event.bucket, Key=event.key)
        except ClientError as e:
            if is_not_found(e):
                return None
            if is_transient(e):
                raise
            # The device chose how its object is stored (an archive storage class, a
            # customer key): what we cannot read is its rejection, not our retry.
            raise UpdateRejected("unreadable", f"S3 says {error_code(e)}") from e
        common["etag"] = etag_of(obj["ETag"])
        common["size"] = int(obj["ContentLength"])
        check_size(common["size"], expected.size_limit)
        data = obj["Body"].read(expected.size_limit + 1)
        decline = read_decline(data, expected)
        if decline is not None:
            said = decline.reason.value + (f": {decline.detail}" if decline.detail else "")
            return Answer(outcome=Outcome.DECLINED, reason=said, **common)
        accepted = validate_update(data, expected, base_model(ctx.models, base_version))
    except UpdateRejected as e:
        common.setdefault("etag", etag_of(event.etag))
        return Answer(outcome=Outcome.REJECTED, reason=f"{e.reason}: {e.detail}"[:500], **common)
    except ClientError:
        raise
    except Exception as e:  # our own failure on these bytes costs this update only
        logger.exception(
            "update judging failed", extra={"key": event.key, "error": type(e).__name__}
        )
        common.setdefault("etag", etag_of(event.etag))
        return Answer(
            outcome=Outcome.REJECTED,
            reason=f"internal_error: {type(e).__name__}: {e}"[:500],
            **common,
        )
    meta = accepted.metadata
    timings = dict(meta.timings)
    if meta.upload_started_at:
        timings["upload_s"] = min(max(0.0, received_at - meta.upload_started_at), window_seconds)
    return Answer(
        outcome=Outcome.ACCEPTED,
        num_examples=meta.num_examples,
        metrics=dict(meta.metrics),
        timings=timings,
        bytes_down=meta.bytes_down,
        delta_norm=accepted.delta_norm or 0.0,
        **common,
    )


def _reject_other(
    ctx: AveragerContext,
    round_: Round,
    event: UpdateEvent,
    client: str,
    reason: str,
    detail: str,
    *,
    discard: bool = True,
) -> UpdateOutcome:
    return refuse_other(ctx, round_.round, event, client, reason, detail, discard=discard)


def refuse_other(
    ctx: AveragerContext,
    number: int,
    event: UpdateEvent,
    client: str,
    reason: str,
    detail: str,
    *,
    discard: bool = True,
) -> UpdateOutcome:
    """A refusal that is not the client's answer (not selected, answered already, too early
    or late): a log line here and the handler's metric, the object deleted, nothing written,
    and the round not moved on (the tick does that). A device can send any number of these,
    so none may write the round item that every answer's transaction writes too
    (docs/scale.md, junk uploads)."""
    logger.warning(
        "update rejected",
        extra={
            "round": number,
            "client_id": client,
            "key": event.key,
            "etag": etag_of(event.etag),
            "size": event.size,
            "reason": reason,
            "detail": detail,
        },
    )
    if discard:
        discard_refused(ctx, event)
    return UpdateOutcome(event.key, UpdateResult.REJECTED, reason, client, number)


def discard_refused(ctx: AveragerContext, event: UpdateEvent) -> None:
    """Delete a refused upload from the updates bucket, only while it is still the object
    refused (``If-Match`` on its ETag: a newer upload to the key, an accepted answer among
    them, is never touched), so junk does not pile up until the lifecycle expires it.
    Best effort: a failed delete is logged, never retried (the lifecycle rule is the floor)."""
    etag = etag_of(event.etag)
    if not etag or event.bucket != ctx.names.updates_bucket:
        return
    try:
        ctx.s3.delete_object(Bucket=event.bucket, Key=event.key, IfMatch=f'"{etag}"')
    except ClientError as e:
        if not is_not_found(e) and error_code(e) not in ("PreconditionFailed", "412"):
            logger.warning(
                "refused update not deleted", extra={"key": event.key, "error": error_code(e)}
            )


def _after_answer(ctx: AveragerContext, round_: Round, outcome: UpdateOutcome) -> UpdateOutcome:
    """An answer (or a refusal) may complete the round's quorum: move the round on."""
    finished = transitions.advance(ctx, round_)
    if finished is not None:
        return replace(outcome, finished_round=finished.round, finished=finished)
    return outcome


def etag_of(value: str) -> str:
    return value.strip('"')


def arrival(event: UpdateEvent, now: float) -> float:
    """When the update reached S3, if the event says; otherwise now. Never later than now."""
    return min(event.uploaded_at, now) if event.uploaded_at is not None else now
