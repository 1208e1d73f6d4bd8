"""Accepting client updates and turning a round's accepted updates into the next model.

Driven by S3 ObjectCreated events (at least once, out of order, possibly concurrent) and by
a periodic tick. Every decision is a conditional write on the round record, so duplicated
events are no-ops, a client answers a round once, and exactly one invocation aggregates.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.cost import StackShape, figures_from_round, round_cost_summary
from sfl.core.events import UpdateEvent
from sfl.core.quorum import QuorumView, get_quorum_policy
from sfl.core.resources import ResourceNames
from sfl.learning.codec import Header, decode, encode, encode_model
from sfl.learning.compression import UpdateCodec
from sfl.learning.rules.aggregation import build_rule
from sfl.learning.rules.bounds import bounded_weights, clip_scale, model_norm, norm_bound
from sfl.server import shards
from sfl.server.acceptance import Expected, UpdateRejected, check_size, validate_update
from sfl.server.round_updates import Entry, RoundUpdates
from sfl.state.aws import AwsClients, error_code, is_not_found, is_transient
from sfl.state.model_store import ModelStore
from sfl.state.registry import ClientRegistry, statistical_utility
from sfl.state.rounds import Answer, Outcome, RecordResult, Round, RoundState, RoundStore

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Model versions never change once written: the latest base model's tensors are cached per
# container (one model, so the memory of a container stays bounded).
_BASE_MODEL: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
# An aggregation that failed this many times (crash, timeout) is not retried: the round is
# abandoned and the next one starts from the same model.
MAX_AGGREGATION_ATTEMPTS = 3
# How far S3's clock (event times) and the functions' clocks may disagree.
CLOCK_TOLERANCE_SECONDS = 1.0
# The tick looks for at most this many silent clients' uploads (one S3 LIST each): a round of
# 10,000 would otherwise cost 10,000 LISTs a tick. Which ones rotates from tick to tick, so
# every silent client is looked for within a few ticks even in the largest rounds.
MAX_RECOVERY_LOOKS = 1_000


@dataclass(frozen=True)
class UpdateOutcome:
    key: str
    result: str  # accepted | rejected | duplicate | ignored
    reason: str = ""
    client_id: str = ""
    round: int | None = None
    finished_round: int | None = None
    finished: Round | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "") and k != "finished"}


@dataclass(frozen=True)
class TickOutcome:
    round: int | None
    status: str
    action: str
    details: dict[str, Any] = field(default_factory=dict)
    finished: Round | None = None


def _etag(value: str) -> str:
    return value.strip('"')


class Averager:
    def __init__(
        self,
        aws: AwsClients,
        names: ResourceNames,
        config: FederationConfig,
        *,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        on_round_finished: Callable[[Round], None] | None = None,
    ) -> None:
        self.aws = aws
        self.names = names
        self.config = config
        self.clock = clock
        self.owner = owner or uuid.uuid4().hex
        self.rounds = RoundStore(aws.dynamodb, names.rounds_table)
        self.registry = ClientRegistry(aws.dynamodb, names.clients_table)
        self.models = ModelStore(aws.s3, names.models_bucket)
        self.on_round_finished = on_round_finished

    def round_config(self, round_: Round) -> FederationConfig:
        """The configuration a round runs with: the one its record holds (``sfl.state.control``),
        or the one this function was deployed with for rounds that hold none."""
        from sfl.state.control import round_config

        return round_config(round_, self.config)

    # --- updates --------------------------------------------------------------------------

    def handle_update(self, event: UpdateEvent) -> UpdateOutcome:
        try:
            key = layout.parse_update_key(event.key)
        except layout.MalformedKeyError as e:
            logger.warning(
                "update rejected",
                extra={"key": event.key, "reason": "malformed_key", "detail": str(e)},
            )
            return UpdateOutcome(event.key, "rejected", "malformed_key")
        if event.bucket != self.names.updates_bucket:
            logger.warning("update ignored", extra={"key": event.key, "bucket": event.bucket})
            return UpdateOutcome(event.key, "ignored", "wrong_bucket")
        client, number = key.client_id, key.round
        log = {"round": number, "client_id": client, "key": event.key}
        # O(1) whatever the round's size: the round item (counters) and this client's slot.
        round_ = self.rounds.get(self.config.experiment, number, slots=False)
        if round_ is None:
            logger.warning("update rejected", extra={**log, "reason": "unknown_round"})
            return UpdateOutcome(event.key, "rejected", "unknown_round", client, number)

        slot = self.rounds.slot(self.config.experiment, number, client)
        existing = slot.answer if slot is not None else None
        if existing is not None and event.etag and existing.etag == _etag(event.etag):
            logger.info("duplicate delivery ignored", extra=log)
            return self._after_answer(
                round_, UpdateOutcome(event.key, "duplicate", "", client, number)
            )
        if slot is None:
            return self._reject_other(
                round_, event, client, "not_selected", "client was not selected for this round"
            )
        if existing is not None:
            return self._reject_other(
                round_, event, client, "duplicate", "client already answered this round"
            )
        if round_.status is not RoundState.OPEN:
            return self._reject_other(
                round_, event, client, "round_not_open", f"round is {round_.status}"
            )
        arrived_at = _arrival(event, self.clock())
        if arrived_at < round_.created_at - CLOCK_TOLERANCE_SECONDS:
            # Keys are predictable: an object stored before its round existed was not trained
            # from the round's model, and would claim a turnaround of zero.
            return self._reject_other(
                round_,
                event,
                client,
                "before_round",
                f"stored {round_.created_at - arrived_at:.1f} s before the round started",
            )
        if arrived_at > round_.deadline_at:
            # Still OPEN only because no tick has ended it yet: when S3 stored the update,
            # not when it is processed (a retried or recovered event comes later), decides.
            return self._reject_other(
                round_,
                event,
                client,
                "past_deadline",
                f"stored {arrived_at - round_.deadline_at:.1f} s after the round's hard deadline",
            )

        judging = time.perf_counter()
        answer = self._judge(round_, event, client)
        if answer is None:  # the object is gone (deleted before we got to it)
            return UpdateOutcome(event.key, "ignored", "object_missing", client, number)
        handled = time.perf_counter() - judging
        try:
            recorded = self.rounds.record_answer(
                self.config.experiment, number, client, answer, handling_seconds=handled
            )
        except ClientError as e:
            if error_code(e) != "ValidationException":
                raise
            # DynamoDB refused what we derived from the update: record it as rejected.
            answer = Answer(
                outcome=Outcome.REJECTED,
                key=answer.key,
                etag=answer.etag,
                size=answer.size,
                received_at=answer.received_at,
                reason=f"unstorable: {str(e)[:200]}",
            )
            recorded = self.rounds.record_answer(
                self.config.experiment, number, client, answer, handling_seconds=handled
            )
        if recorded.result is RecordResult.RECORDED and recorded.round is not None:
            self._count_client_round(recorded.round, client, answer)
            level = logging.INFO if answer.outcome is Outcome.ACCEPTED else logging.WARNING
            logger.log(
                level, f"update {answer.outcome.value}", extra={**log, "reason": answer.reason}
            )
            outcome = UpdateOutcome(event.key, answer.outcome.value, answer.reason, client, number)
            return self._after_answer(recorded.round, outcome)
        current = recorded.round or round_
        if recorded.result is RecordResult.ALREADY_ANSWERED:
            if recorded.answer is not None and recorded.answer.etag == answer.etag:
                return self._after_answer(
                    current, UpdateOutcome(event.key, "duplicate", "", client, number)
                )
            return self._reject_other(
                current, event, client, "duplicate", "client already answered this round"
            )
        if recorded.result is RecordResult.NOT_SELECTED:
            return self._reject_other(
                current, event, client, "not_selected", "client was not selected for this round"
            )
        return self._reject_other(
            current, event, client, "round_not_open", f"round is {current.status}"
        )

    def _judge(self, round_: Round, event: UpdateEvent, client: str) -> Answer | None:
        """Download and validate one update; an Answer either way (None if it vanished).

        AWS errors propagate (the event is retried); anything else that goes wrong while
        judging these bytes, including a bug of ours, rejects this one update only."""
        received_at = _arrival(event, self.clock())
        common: dict[str, Any] = {"key": event.key, "size": event.size, "received_at": received_at}
        try:
            expected = Expected(
                round=round_.round,
                client_id=client,
                base_version=round_.base_version,
                base_header=self.base_header(round_.base_version),
                max_bytes=self.round_config(round_).max_update_bytes,
                max_num_examples=self.round_config(round_).max_num_examples,
                codec=UpdateCodec.from_config(self.round_config(round_)),
            )
            check_size(event.size, expected.size_limit)
            try:
                obj = self.aws.s3.get_object(Bucket=event.bucket, Key=event.key)
            except ClientError as e:
                if is_not_found(e):
                    return None
                if is_transient(e):
                    raise
                # The device chose how its object is stored (an archive storage class, a
                # customer key): what we cannot read is its rejection, not our retry.
                raise UpdateRejected("unreadable", f"S3 says {error_code(e)}") from e
            common["etag"] = _etag(obj["ETag"])
            common["size"] = int(obj["ContentLength"])
            check_size(common["size"], expected.size_limit)
            data = obj["Body"].read(expected.size_limit + 1)
            accepted = validate_update(data, expected, self.base_model(round_.base_version))
        except UpdateRejected as e:
            common.setdefault("etag", _etag(event.etag))
            return Answer(
                outcome=Outcome.REJECTED, reason=f"{e.reason}: {e.detail}"[:500], **common
            )
        except ClientError:
            raise
        except Exception as e:  # our own failure on these bytes costs this update only
            logger.exception(
                "update judging failed", extra={"key": event.key, "error": type(e).__name__}
            )
            common.setdefault("etag", _etag(event.etag))
            return Answer(
                outcome=Outcome.REJECTED,
                reason=f"internal_error: {type(e).__name__}: {e}"[:500],
                **common,
            )
        meta = accepted.metadata
        timings = dict(meta.timings)
        if meta.upload_started_at:
            round_seconds = max(0.0, round_.deadline_at - round_.created_at)
            timings["upload_s"] = min(max(0.0, received_at - meta.upload_started_at), round_seconds)
        return Answer(
            outcome=Outcome.ACCEPTED,
            num_examples=meta.num_examples,
            metrics=dict(meta.metrics),
            timings=timings,
            bytes_down=meta.bytes_down,
            delta_norm=accepted.delta_norm or 0.0,
            **common,
        )

    def _count_client_round(self, round_: Round, client: str, answer: Answer | None) -> None:
        """Fold this round into the client's server-side record (turnaround EWMA, answered /
        missed, recent picks, the accepted update's bounded utility). Best effort: the
        registry is advisory, the round record is the truth."""
        answered = answer is not None and answer.outcome is Outcome.ACCEPTED
        config = self.round_config(round_)
        utility = None
        if answer is not None and answered:
            turnaround = answer.received_at - round_.created_at
            utility = statistical_utility(
                answer.metrics, answer.num_examples, config.max_num_examples
            )
        else:
            turnaround = round_.deadline_at - round_.created_at
        try:
            self.registry.record_round(
                client,
                round_.round,
                answered=answered,
                turnaround=turnaround,
                b=config.ewma_b,
                utility=utility,
                pick_window=config.selection_window,
            )
        except Exception as e:  # never let bookkeeping fail an update or a round
            logger.warning(
                "client registry not updated",
                extra={"client_id": client, "round": round_.round, "error": type(e).__name__},
            )

    def _reject_other(
        self, round_: Round, event: UpdateEvent, client: str, reason: str, detail: str
    ) -> UpdateOutcome:
        rejection = {
            "client_id": client,
            "key": event.key,
            "etag": _etag(event.etag),
            "reason": reason,
            "detail": detail,
            "at": self.clock(),
        }
        self.rounds.record_other_rejection(round_.experiment, round_.round, rejection)
        logger.warning(
            "update rejected",
            extra={
                "round": round_.round,
                "client_id": client,
                "key": event.key,
                "reason": reason,
                "detail": detail,
            },
        )
        outcome = UpdateOutcome(event.key, "rejected", reason, client, round_.round)
        return self._after_answer(round_, outcome) if reason != "round_not_open" else outcome

    def _after_answer(self, round_: Round, outcome: UpdateOutcome) -> UpdateOutcome:
        finished = self.advance(round_)
        if finished is not None:
            return replace(outcome, finished_round=finished.round, finished=finished)
        return outcome

    # --- quorum, aggregation ---------------------------------------------------------------

    def quorum_view(self, round_: Round) -> QuorumView:
        """The round's counts from its item's counters: no slot is read."""
        return QuorumView(
            selected=round_.num_selected,
            answered=round_.num_answered,
            accepted=round_.num_accepted,
            now=self.clock(),
            created_at=round_.created_at,
            soft_deadline_at=round_.soft_deadline_at or round_.deadline_at,
            deadline_at=round_.deadline_at,
        )

    def advance(self, round_: Round) -> Round | None:
        """Move a round on if it can: aggregate at quorum, abandon past its deadline.

        Returns the finished round when this call finished it.
        """
        now = self.clock()
        if round_.status is RoundState.AGGREGATING:
            if round_.lease_expires_at >= now:
                return None  # someone holds the lease
            if round_.aggregation_attempts >= MAX_AGGREGATION_ATTEMPTS:
                reason = f"aggregation failed {round_.aggregation_attempts} times"
                if self.rounds.abandon_stuck(round_.experiment, round_.round, reason, now):
                    return self._finished(round_.round)
                return None
        elif round_.status is not RoundState.OPEN:
            return None
        view = self.quorum_view(round_)
        config = self.round_config(round_)
        quorum = get_quorum_policy(config.quorum)(view, config)
        if round_.status is RoundState.OPEN and not quorum:
            if view.past_deadline:
                reason = f"deadline passed with {view.answered} of {view.selected} answered"
                if self.rounds.abandon(round_.experiment, round_.round, reason, now):
                    return self._finished(round_.round)
            return None
        won = self.rounds.begin_aggregation(
            round_.experiment, round_.round, self.owner, now, config.aggregation_lease_seconds
        )
        if won is None:
            return None
        if not won.num_accepted:
            reason = "no acceptable update: every answer was rejected"
            if self.rounds.abandon(
                won.experiment, won.round, reason, self.clock(), owner=self.owner
            ):
                return self._finished(won.round)
            return None
        if self.aggregate(won):
            return self._finished(won.round)
        return None

    def _finished(self, number: int) -> Round | None:
        finished = self.rounds.get(self.config.experiment, number)
        if finished is not None:
            logger.info(
                "round finished",
                extra={
                    "round": number,
                    "status": str(finished.status),
                    "reason": finished.abandon_reason,
                },
            )
            # Selected clients that never answered missed this round (this call alone
            # finished it, so each is counted once).
            for client in finished.selected:  # loaded from its slots, once per round
                if client not in finished.answers:
                    self._count_client_round(finished, client, None)
            if self.on_round_finished is not None:
                self.on_round_finished(finished)
        return finished

    def aggregate(self, round_: Round) -> bool:
        """Turn the accepted updates into the next model version with the configured rule,
        and close the round.

        Every update is weighed and moved within the round's bounds (``sfl.learning.rules.bounds``):
        its weight at most ``max_weight_ratio`` times the median example count, its change
        from the base model clipped to the round's norm bound. One update that cannot be read
        back is left out (``excluded``), never the round. A stateful rule's server state is
        written once beside the new version, before it; a retry that finds it written makes
        the model from that state, so model and state always agree.
        """
        started = self.clock()
        config = self.round_config(round_)
        rule = build_rule(config.aggregation, config.aggregation_params)
        accepted = self.accepted_answers(round_)
        weights = dict(
            zip(
                accepted,
                bounded_weights(
                    [a.num_examples for a in accepted.values()], config.max_weight_ratio
                ),
                strict=True,
            )
        )
        base = self.base_model(round_.base_version)
        bound = norm_bound(
            [a.delta_norm for a in accepted.values() if a.delta_norm > 0],
            factor=config.norm_bound_factor,
            absolute=config.max_update_norm,
            fallback=round_.norm_bound_hint,
            base_norm=model_norm(base),
        )
        entries = [
            Entry(client, a.key, a.etag, weights[client], clip_scale(a.delta_norm, bound))
            for client, a in accepted.items()
        ]
        version = round_.base_version + 1
        previous = self._state(round_.base_version, config.aggregation) if rule.stateful else None
        # --- sharded aggregation (sfl.server.shards): above aggregation_shard_above updates, shard
        # invocations sum them in parallel and this one reduces; else they are read here.
        sharded = shards.sharded_updates(self.aws.s3, self.names, round_, rule, entries, config)
        # ------------------------------------------------------------------------------------
        with sharded or RoundUpdates(
            self.aws.s3,
            self.names.updates_bucket,
            entries,
            base,
            self.models.header(round_.base_version),
            in_flight=config.aggregation_in_flight,
        ) as updates:
            result = rule.aggregate(base, updates, previous)
            read = list(updates.read)
            excluded = dict(updates.excluded)
        if result is None:
            reason = "no accepted update could be read back for aggregation"
            return self.rounds.abandon(
                round_.experiment, round_.round, reason, self.clock(), owner=self.owner
            )
        model = result.model
        if result.state is not None and not self.models.put_state(
            version, encode(result.state, ModelStore.state_metadata(version, config.aggregation))
        ):
            stored = self._state(version, config.aggregation)
            if stored is None:
                raise RuntimeError(f"server state of version {version} exists for another rule")
            model = rule.model_from_state(base, stored)
        used = [(client, accepted[client]) for client in read]
        body = encode_model(model, version=version, round=round_.round, participants=len(used))
        rewritten = not self.models.put_model(version, body)
        if rewritten:
            logger.warning("model version already written; keeping it", extra={"version": version})
        finished = self.clock()
        total_examples = sum(a.num_examples for _, a in used)
        details = dict(result.details or {})
        summary = {
            "participants": len(used),
            "num_examples": total_examples,
            "weight": sum(weights[c] for c, _ in used),
            "client_loss": _weighted(used, weights, "loss", 0.0, 1e6),
            "client_accuracy": _weighted(used, weights, "accuracy", 0.0, 1.0),
            "aggregation": config.aggregation,
            "aggregate_seconds": finished - started,
            "model_bytes": len(body),
            "bytes_up": round_.bytes_up,
            "bytes_down": round_.bytes_down,
            "norm_bound": bound if math.isfinite(bound) else None,
            "clipped": [e.client for e in entries if e.scale < 1.0 and e.client in read],
            "excluded": excluded,
            "model_already_written": rewritten,
            **details,
        }
        summary["cost"] = self._cost(round_, summary, stateful=rule.stateful)
        closed = self.rounds.close(
            round_.experiment, round_.round, self.owner, version, finished, summary
        )
        logger.info(
            "round aggregated",
            extra={
                "round": round_.round,
                "model_version": version,
                "closed": closed,
                **{
                    k: v
                    for k, v in summary.items()
                    if k not in ("excluded", "clipped", "krum_kept")
                },
            },
        )
        return closed

    def accepted_answers(self, round_: Round) -> dict[str, Answer]:
        """The round's accepted answers, by client id: from the loaded round, or one
        paginated query of its slots."""
        if round_.slots_loaded:
            return dict(sorted(round_.accepted.items()))
        slots = self.rounds.slots(round_.experiment, round_.round, only="accepted")
        found = {s.client_id: s.answer for s in slots if s.answer is not None}
        return {c: a for c, a in sorted(found.items()) if a.outcome is Outcome.ACCEPTED}

    def _cost(self, round_: Round, summary: dict[str, Any], *, stateful: bool) -> dict[str, Any]:
        """The round's estimated dollars (``sfl.core.cost``) from what it measured. Downloads are
        counted as one model per selected device, not from the devices' own reports.
        Bookkeeping: a failure here never keeps a round from closing."""
        try:
            figures = figures_from_round(
                selected=round_.num_selected,
                accepted=round_.num_accepted,
                rejected=round_.num_rejected,
                other_rejections=sum(int(v) for v in round_.rejection_counts.values()),
                candidates=round_.candidates,
                summary={**summary, "bytes_down": 0},
                select_seconds=round_.select_seconds,
                update_handling_seconds=round_.handling_seconds or None,
                stateful_rule=stateful,
            )
            return round_cost_summary(figures, StackShape.from_environment())
        except Exception as e:
            logger.warning("round cost not estimated", extra={"error": type(e).__name__})
            return {"usd": None, "unpriced": f"{type(e).__name__}: {e}"[:200]}

    def base_header(self, version: int) -> Header:
        return self.models.header(version)

    def base_model(self, version: int) -> dict[str, torch.Tensor]:
        """A model version's tensors; the latest one asked for is cached per container."""
        cache_key = (self.names.models_bucket, version)
        model = _BASE_MODEL.get(cache_key)
        if model is None:
            model = decode(self.models.model_bytes(version))
            _BASE_MODEL.clear()
            _BASE_MODEL[cache_key] = model
        return model

    def _state(self, version: int, rule: str) -> dict[str, torch.Tensor] | None:
        body = self.models.state_bytes(version, rule)
        return None if body is None else decode(body)

    # --- tick -----------------------------------------------------------------------------

    def tick(self) -> TickOutcome:
        """The scheduled watchdog: first deadlines, quorum and lost leases, then a look for
        updates whose S3 event never arrived, each on its own (one bad object cannot stop
        the watchdog). An update that lost its event and is only found after the hard
        deadline has passed without quorum is too late: the deadline came first."""
        latest = self.rounds.latest(self.config.experiment, slots=False)
        if latest is None:
            return TickOutcome(None, "", "no rounds yet")
        if latest.status.finished:
            return TickOutcome(latest.round, str(latest.status), "nothing to do")
        finished = self.advance(latest)
        if finished is not None:
            return TickOutcome(latest.round, str(finished.status), "finished", finished=finished)
        current = self.rounds.get(latest.experiment, latest.round, slots=False) or latest
        recovered: list[str] = []
        if current.status is RoundState.OPEN:
            recovered, finished = self.recover_lost_updates(current)
        if finished is not None:
            return TickOutcome(
                latest.round,
                str(finished.status),
                "finished",
                {"recovered": recovered},
                finished=finished,
            )
        return TickOutcome(latest.round, str(current.status), "waiting", {"recovered": recovered})

    def recover_lost_updates(self, round_: Round) -> tuple[list[str], Round | None]:
        """Find uploads whose S3 event never arrived: look for silent clients' keys, at most
        ``MAX_RECOVERY_LOOKS`` a tick, a different window of them each tick.

        Each object is handled on its own: judging it never raises (``_judge``), and an AWS
        error on one object is logged against it while the look goes on. Returns what was
        found, and the round if handling one finished it."""
        recovered = []
        if round_.slots_loaded:
            silent = [c for c in round_.selected if c not in round_.answers]
        else:  # one paginated query of the slots still waiting
            silent = [
                s.client_id
                for s in self.rounds.slots(round_.experiment, round_.round, only="unanswered")
            ]
        for client in _window(sorted(silent), MAX_RECOVERY_LOOKS, int(self.clock())):
            key = layout.update_key(client, round_.round)
            try:
                listing = self.aws.s3.list_objects_v2(
                    Bucket=self.names.updates_bucket, Prefix=key, MaxKeys=1
                )
                found = [o for o in listing.get("Contents", []) if o["Key"] == key]
                if not found:
                    continue
                obj = found[0]
                logger.warning(
                    "update found without its S3 event",
                    extra={"round": round_.round, "client_id": client, "key": key},
                )
                event = UpdateEvent(
                    bucket=self.names.updates_bucket,
                    key=key,
                    size=int(obj["Size"]),
                    etag=str(obj.get("ETag", "")),
                    uploaded_at=obj["LastModified"].timestamp(),
                )
                outcome = self.handle_update(event)
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


def _window(items: list[str], size: int, turn: int) -> list[str]:
    """``size`` consecutive items (wrapping around) from a start that moves with ``turn``:
    all of them when they fit."""
    if len(items) <= size:
        return items
    start = (turn * size) % len(items)
    return (items + items)[start : start + size]


def _arrival(event: UpdateEvent, now: float) -> float:
    """When the update reached S3, if the event says; otherwise now. Never later than now."""
    return min(event.uploaded_at, now) if event.uploaded_at is not None else now


def _weighted(
    used: list[tuple[str, Answer]], weights: dict[str, float], metric: str, lo: float, hi: float
) -> float | None:
    """A client-reported metric averaged with the clients' bounded weights, each value
    clamped to its plausible range, so no single device sets the round's figure."""
    pairs = [
        (weights[c], min(max(a.metrics[metric], lo), hi)) for c, a in used if metric in a.metrics
    ]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total else None


def bootstrap_model(
    aws: AwsClients, names: ResourceNames, state: dict[str, Any], *, seed: int
) -> bool:
    """Write global model version 0 unless it exists; True if this call wrote it."""
    body = encode_model(state, version=0, seed=seed)
    return ModelStore(aws.s3, names.models_bucket).put_model(0, body)
