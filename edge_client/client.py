"""The client loop: heartbeat, poll the assignment cheaply, answer rounds it was picked for.

Everything the client downloads is checked before it is used: a malformed assignment is
skipped, a bad global model (``edge_client.global_model``) costs that round, not the process.
AWS failures — a token exchange service that is down, no network — are retried with back-off
in the loop, which a stop (SIGTERM) ends at once.

A picked device reads its data afresh (what it collected since the last round counts). When
it cannot give an update — no data, fewer examples than the round's ``min_examples``, a task
that raises, a NaN loss, a model of another shape, training past the deadline — it uploads a
decline with the reason (``sfl.core.decline``) instead, so the round need not wait for it,
and goes on to the next round: a task that misbehaves costs one answer, not the process.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from edge_client.global_model import ModelRejected, check_global_model, size_limit
from edge_client.notices import RoundNotices
from edge_client.settings import ClientSettings
from sfl.core import layout
from sfl.core.decline import Decline, DeclineReason, clean_detail
from sfl.learning import codec
from sfl.learning.compression import UPDATE_CODECS, UpdateCodec, encode_update
from sfl.learning.local_privacy import LOCAL_DELTA, device_epsilon, privatise
from sfl.learning.rules.privacy import secret_generator
from sfl.learning.tasks.base import ClientData, Metrics, TrainConfig, TrainingTask
from sfl.state.aws import AwsCallFailed, AwsClients, aws_call, error_code
from sfl.state.model_store import ModelStore
from sfl.state.registry import ClientRegistry

logger = logging.getLogger(__name__)

_MAX_EPOCHS = 10_000
_MAX_BATCH = 1_000_000
_MAX_PROXIMAL_MU = 1_000.0
_MAX_MIN_EXAMPLES = 10**9
# Training stops this long before the round's hard deadline (at most a tenth of the time
# left when the round was picked up), so a decline for the deadline still reaches the round.
DEADLINE_MARGIN_SECONDS = 10.0
_DEADLINE_MARGIN_SHARE = 0.1
_Result = TypeVar("_Result")


class RoundInterrupted(Exception):
    """Training was stopped (SIGTERM) before the update was uploaded."""


class RoundDeclined(Exception):
    """This device cannot give an update this round; the server is told why."""

    def __init__(self, reason: DeclineReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = clean_detail(detail)


class AssignmentUnreadable(ValueError):
    """The assignment object is not one this client can act on (skipped, never fatal)."""


def _reject_constant(name: str) -> Any:
    raise AssignmentUnreadable(f"{name} is not a number JSON allows")


def _field(d: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise AssignmentUnreadable(f"{name!r} is missing or not {kind}")
    return value


def _int(d: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value: int = _field(d, name, int)
    if not low <= value <= high:
        raise AssignmentUnreadable(f"{name!r}={value} is not in {low}..{high}")
    return value


def _finite(d: Mapping[str, Any], name: str) -> float:
    value = float(_field(d, name, (int, float)))
    if not math.isfinite(value):
        raise AssignmentUnreadable(f"{name!r} is not finite")
    return value


def _train_config(d: Any) -> TrainConfig:
    if not isinstance(d, dict):
        raise AssignmentUnreadable("'train_config' is not an object")
    lr = _finite(d, "lr")
    if not 0 < lr <= 1e3:
        raise AssignmentUnreadable(f"'lr'={lr} is not in (0, 1000]")
    return TrainConfig(
        local_epochs=_int(d, "local_epochs", 1, _MAX_EPOCHS),
        lr=lr,
        batch_size=_int(d, "batch_size", 1, _MAX_BATCH),
        seed=_int(d, "seed", -(2**63), 2**63 - 1) if "seed" in d else 0,
        proximal_mu=_proximal_mu(d),
    )


def _proximal_mu(d: Mapping[str, Any]) -> float:
    """FedProx's mu, absent from assignments written before it existed (then 0)."""
    if "proximal_mu" not in d:
        return 0.0
    mu = _finite(d, "proximal_mu")
    if not 0 <= mu <= _MAX_PROXIMAL_MU:
        raise AssignmentUnreadable(f"'proximal_mu'={mu} is not in 0..{_MAX_PROXIMAL_MU}")
    return mu


def _min_examples(d: Mapping[str, Any]) -> int:
    """Fewest training examples to train with; assignments written before it existed: 1."""
    return _int(d, "min_examples", 1, _MAX_MIN_EXAMPLES) if "min_examples" in d else 1


def _update_codec(d: Mapping[str, Any]) -> UpdateCodec:
    """How to encode the update; assignments written before codecs existed mean "none"."""
    name = d.get("update_codec", "none")
    if name not in UPDATE_CODECS:
        raise AssignmentUnreadable(
            f"'update_codec'={str(name)[:40]!r} is not one of {UPDATE_CODECS}"
        )
    if "topk_fraction" not in d:
        return UpdateCodec(name)
    try:
        return UpdateCodec(name, _finite(d, "topk_fraction"))
    except ValueError as e:
        raise AssignmentUnreadable(str(e)) from e


@dataclass(frozen=True)
class Assignment:
    round: int
    status: str
    base_version: int
    model_key: str
    selected: frozenset[str]
    deadline_at: float
    train_config: TrainConfig
    update_codec: UpdateCodec = field(default_factory=UpdateCodec)
    min_examples: int = 1

    @classmethod
    def from_json(cls, body: bytes) -> Assignment:
        """Parse and check ``rounds/current.json`` of a round; raises ``AssignmentUnreadable``."""
        return cls._from_round(_assignment_object(body))

    @classmethod
    def for_client(cls, body: bytes, client_id: str) -> Assignment | None:
        """What ``client_id`` is asked to do: the round (whoever it picked), or in buffered
        mode its own ticket, read as a round of its own (None: no ticket for it)."""
        d = _assignment_object(body)
        if d.get("mode") != "buffered":
            return cls._from_round(d)
        tickets = _field(d, "tickets", list)
        mine = [t for t in tickets if isinstance(t, dict) and t.get("client_id") == client_id]
        if not mine:
            return None
        ticket = mine[-1]
        train_config = _field(d, "train_config", dict)
        seed = train_config.get("seed", 0)
        number = ticket.get("round")
        if isinstance(seed, int) and isinstance(number, int) and not isinstance(number, bool):
            train_config = {**train_config, "seed": seed + number}
        return cls._from_round(
            {
                **ticket,
                "status": d.get("status"),
                "selected": [client_id],
                "train_config": train_config,
            }
        )

    @classmethod
    def _from_round(cls, d: dict[str, Any]) -> Assignment:
        base_version = _int(d, "base_version", 0, 10**12)
        model_key = _field(d, "model_key", str)
        if model_key != layout.model_key(base_version):
            raise AssignmentUnreadable(
                f"model_key {model_key[:200]!r} is not version {base_version}'s key"
            )
        selected = _field(d, "selected", list)
        if not all(isinstance(c, str) for c in selected):
            raise AssignmentUnreadable("'selected' holds something other than client ids")
        return cls(
            round=_int(d, "round", 1, 10**12),
            status=_field(d, "status", str),
            base_version=base_version,
            model_key=model_key,
            selected=frozenset(selected),
            deadline_at=_finite(d, "deadline_at"),
            train_config=_train_config(d.get("train_config")),
            update_codec=_update_codec(d["train_config"]),
            min_examples=_min_examples(d["train_config"]),
        )


def _assignment_object(body: bytes) -> dict[str, Any]:
    if len(body) > layout.MAX_ASSIGNMENT_BYTES:
        raise AssignmentUnreadable(f"{len(body)} bytes, over {layout.MAX_ASSIGNMENT_BYTES}")
    try:
        d = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise AssignmentUnreadable(f"not JSON: {e}") from e
    if not isinstance(d, dict):
        raise AssignmentUnreadable("not a JSON object")
    return d


def _no_hook(assignment: Assignment, train_seconds: float) -> None:
    return None


@dataclass
class RoundHooks:
    """Seams for the simulator's heterogeneous speeds and failures; no-ops by default.

    ``before_upload(assignment, train_seconds)`` runs after local training and evaluation,
    just before the update is uploaded; it may sleep (slow device, straggler) or raise
    (a crash: the update is never uploaded).
    """

    before_upload: Callable[[Assignment, float], None] = _no_hook


class EdgeClient:
    def __init__(
        self,
        settings: ClientSettings,
        aws: AwsClients,
        task: TrainingTask,
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        hooks: RoundHooks | None = None,
        wake: Callable[[float], None] | None = None,
        notices: RoundNotices | None = None,
    ) -> None:
        """``notices``: the subscription to round notices (``edge_client.notices``); while it
        is live a notice ends the pause and polling and heartbeats slow down to the push
        periods. ``wake`` (local mode only): a pause that also ends when the assignment object
        was written, used while no subscription is live."""
        self.settings = settings
        self.aws = aws
        self.task = task
        self.stop = stop or threading.Event()
        self.clock = clock
        self.hooks = hooks or RoundHooks()
        self.wake = wake
        self.notices = notices
        self.registry = ClientRegistry(aws.dynamodb, settings.clients_table)
        self.models = ModelStore(aws.s3, settings.models_bucket)
        self.rounds_answered = 0
        self.rounds_skipped = 0  # picked, but the global model was refused
        self.rounds_declined = 0  # picked, and told the server why there is no update
        self.local_dp_participations = 0  # updates noised here since the process started
        self._assignment_etag: str | None = None
        self._last_round_seen = 0  # rounds up to this one are never answered (again)
        self._next_heartbeat = 0.0

    # --- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Poll and answer until stopped (or max_rounds answered). Returns an exit code."""
        logger.info("client started", extra={"client_id": self.settings.client_id})
        try:
            return self._run()
        finally:
            if self.notices is not None:
                self.notices.close()

    def _run(self) -> int:
        backoff = self.settings.poll_seconds
        while not self.stop.is_set():
            failed = False
            if self.notices is not None:
                self.notices.connect()  # a no-op while live; else retried when due
            try:
                if self.clock() >= self._next_heartbeat:
                    self.heartbeat()
                assignment = self.assignment_to_answer()
                if assignment is not None:
                    self.answer(assignment)
                    if self._done():
                        break
                    continue  # poll again right away: the next round may already be open
                backoff = self._poll_period()
            except RoundInterrupted:
                break
            except AwsCallFailed as e:
                failed = True
                backoff = min(max(backoff, 0.1) * 2, self.settings.max_backoff_seconds)
                # The message carries the fields: Greengrass logs the text, not `extra`.
                logger.warning(
                    "AWS call failed: %s %s %s; retrying in %.1f s",
                    e.service,
                    e.operation,
                    e.code,
                    backoff,
                    extra={
                        "client_id": self.settings.client_id,
                        "service": e.service,
                        "operation": e.operation,
                        "error_code": e.code,
                        "backoff_s": backoff,
                    },
                )
            # jitter keeps a fleet from polling in lockstep
            pause = backoff * random.uniform(0.8, 1.2)
            if failed:  # a failure's back-off is never cut short
                self.stop.wait(pause)
            elif self._pushed():
                assert self.notices is not None
                self.notices.wait(pause, self.stop)
            elif self.wake is not None and not self.stop.is_set():
                self.wake(pause)
            else:
                self.stop.wait(pause)
        logger.info("client stopped", extra={"client_id": self.settings.client_id})
        return 0

    def _pushed(self) -> bool:
        """Whether round notices reach this client now (a live subscription)."""
        return self.notices is not None and self.notices.live

    def _poll_period(self) -> float:
        """Idle polling: a slow fallback while notices arrive, ``poll_seconds`` otherwise."""
        return self.settings.push_poll_seconds if self._pushed() else self.settings.poll_seconds

    def _done(self) -> bool:
        return (
            self.settings.max_rounds is not None
            and self.rounds_answered + self.rounds_declined >= self.settings.max_rounds
        )

    def heartbeat(self) -> None:
        """Tell the registry this client is alive; the server measures everything else."""
        with aws_call("dynamodb", "UpdateItem"):
            self.registry.heartbeat(
                self.settings.client_id,
                now=self.clock(),
                active_window_seconds=self.settings.active_window_seconds,
            )
        period = (
            self.settings.push_heartbeat_seconds
            if self._pushed()
            else self.settings.heartbeat_seconds
        )
        self._next_heartbeat = self.clock() + period

    def poll(self) -> Assignment | None:
        """Conditional GET of the assignment: a 304 costs almost nothing.

        The device role may not list the models bucket, so S3 answers a poll before the first
        round is published with 403, not 404: until this client has read an assignment, that
        means "no round yet". Once it has, the assignment is never absent, and 403 is an error.
        """
        with aws_call("s3", "GetObject"):
            try:
                found = self.models.assignment(
                    self._assignment_etag, layout.MAX_ASSIGNMENT_BYTES + 1
                )
            except ClientError as e:
                if error_code(e) != "AccessDenied" or self._assignment_etag is not None:
                    raise
                found = None
        if found is None:  # unchanged, or no round published yet
            return None
        body, self._assignment_etag = found
        try:
            return Assignment.for_client(body, self.settings.client_id)
        except AssignmentUnreadable as e:
            logger.warning("assignment skipped: %s", e, extra={"error": str(e)})
            return None

    def assignment_to_answer(self) -> Assignment | None:
        """Poll; the assignment if it is a new open round that picked this client."""
        assignment = self.poll()
        if assignment is not None and self._should_answer(assignment):
            return assignment
        return None

    def _should_answer(self, a: Assignment) -> bool:
        if a.round <= self._last_round_seen:
            return False
        self._last_round_seen = a.round
        return (
            a.status == "OPEN"
            and self.settings.client_id in a.selected
            and self.clock() < a.deadline_at
        )

    # --- one round --------------------------------------------------------------------------

    def _global_model(self, a: Assignment) -> tuple[Any, int] | None:
        """The round's base model, built and loaded, with its size; None if it is refused."""
        model = _task_step("build_model", self.task.build_model)
        reference = model.state_dict()
        limit = size_limit(reference)
        with aws_call("s3", "GetObject"):
            # Never more than the bound crosses the network, whatever the object's size.
            body, size = self.models.model_body(a.model_key, limit)
        try:
            if size > limit:
                raise ModelRejected("too_large", f"{size} bytes; this task's model is <= {limit}")
            tensors = check_global_model(body, version=a.base_version, reference=reference)
            model.load_state_dict(tensors)
        except ModelRejected as e:
            reason, detail = e.reason, e.detail
        except Exception as e:  # a bug or a surprise in a library must cost a round, not the client
            reason, detail = "unloadable", f"{type(e).__name__}: {e}"
        else:
            return model, len(body)
        self.rounds_skipped += 1
        logger.warning(
            "global model refused (%s): %s; round %d skipped",
            reason,
            detail,
            a.round,
            extra={"client_id": self.settings.client_id, "round": a.round, "reason": reason},
        )
        return None

    def answer(self, a: Assignment) -> None:
        """Read the data, download and check the base model, train, evaluate locally, upload
        the update; or, if this device cannot give one, upload a decline with the reason."""
        logger.info(
            "round picked up", extra={"client_id": self.settings.client_id, "round": a.round}
        )
        started = self.clock()
        try:
            self._answer(a, started)
        except RoundDeclined as e:
            if self.stop.is_set():  # stopping: nothing half-done is uploaded, not even this
                raise RoundInterrupted from e
            self.decline(a, e.reason, e.detail)

    def _answer(self, a: Assignment, started: float) -> None:
        data = self._client_data(a)
        loaded = self._global_model(a)
        if loaded is None:
            return
        model, bytes_down = loaded
        reference = _signature(model.state_dict())
        # A compressed update is a change from the base, and local DP clips the change: keep
        # the base to measure it.
        local_dp = self.settings.local_dp_clip > 0
        keep = local_dp or a.update_codec.name != "none"
        base = _snapshot(model.state_dict()) if keep else None
        downloaded = self.clock()
        stop_at = a.deadline_at - min(
            DEADLINE_MARGIN_SECONDS, _DEADLINE_MARGIN_SHARE * max(0.0, a.deadline_at - started)
        )

        def should_stop() -> bool:
            return self.stop.is_set() or self.clock() >= stop_at

        train_metrics = _task_step(
            "train", self.task.train, model, data.train, a.train_config, should_stop
        )
        if self.stop.is_set():
            raise RoundInterrupted
        trained = self.clock()
        if trained >= stop_at:
            raise RoundDeclined(
                DeclineReason.DEADLINE,
                f"training ran {trained - downloaded:.1f} s, until {a.deadline_at - trained:.1f} s "
                "before the round's deadline",
            )
        local_eval = _task_step("evaluate", self.task.evaluate, model, data.eval)
        evaluated = self.clock()
        if evaluated >= a.deadline_at:
            raise RoundDeclined(DeclineReason.DEADLINE, "evaluation ended after the deadline")
        metrics = _reported_metrics(train_metrics, local_eval)
        trained_state = model.state_dict()
        _check_trained(trained_state, reference)
        if local_dp and base is not None:
            trained_state = self._privatise(trained_state, base)
        self.hooks.before_upload(a, trained - downloaded)
        if self.stop.is_set():
            raise RoundInterrupted
        metadata = codec.UpdateMetadata(
            round=a.round,
            client_id=self.settings.client_id,
            base_version=a.base_version,
            num_examples=len(data.train),
            metrics=metrics,
            timings={
                "download_s": downloaded - started,
                "train_s": trained - downloaded,
                "eval_s": evaluated - trained,
            },
            bytes_down=bytes_down,
            upload_started_at=self.clock(),
        )
        update = encode_update(
            trained_state,
            trained_state if base is None else base,
            a.update_codec,
            metadata.to_header(),
        )
        self.upload(a, update, started)

    def _privatise(self, trained: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
        """Local DP (docs/privacy.md): the change clipped and noised here, before upload; the
        device logs what its participations have cost it."""
        z = self.settings.local_dp_noise_multiplier
        out = privatise(
            trained,
            base,
            clip=self.settings.local_dp_clip,
            noise_multiplier=z,
            generator=secret_generator(),
        )
        self.local_dp_participations += 1
        spent = device_epsilon(self.local_dp_participations, z)
        logger.info(
            "local DP: change clipped and noised before upload",
            extra={
                "client_id": self.settings.client_id,
                "participations": self.local_dp_participations,
                "epsilon": spent,
                "delta": LOCAL_DELTA,
            },
        )
        return out

    def _client_data(self, a: Assignment) -> ClientData:
        """The device's data, read afresh for this round (what it collected since counts);
        ``RoundDeclined`` if there is none, too little, or the task cannot read it. No data:
        a missing or empty data directory, a task raising ``FileNotFoundError``, or no
        training examples."""
        try:
            if not any(Path(self.settings.data_dir).iterdir()):
                raise FileNotFoundError(f"data directory {self.settings.data_dir} is empty")
        except OSError as e:  # missing, not a directory, or unreadable
            raise RoundDeclined(DeclineReason.NO_DATA, f"{type(e).__name__}: {e}") from e
        try:
            data = self.task.load_client_data(self.settings.data_dir)
            examples = len(data.train)
        except FileNotFoundError as e:
            raise RoundDeclined(DeclineReason.NO_DATA, f"{type(e).__name__}: {e}") from e
        except Exception as e:  # the user's code: its failure costs this round's answer
            raise RoundDeclined(
                DeclineReason.TASK_FAILED, f"load_client_data: {type(e).__name__}: {e}"
            ) from e
        if examples == 0:
            raise RoundDeclined(DeclineReason.NO_DATA, "no training examples")
        if examples < a.min_examples:
            raise RoundDeclined(
                DeclineReason.TOO_FEW_EXAMPLES,
                f"{examples} training examples; the round asks for at least {a.min_examples}",
            )
        logger.info(
            "client data read",
            extra={"client_id": self.settings.client_id, "round": a.round, "examples": examples},
        )
        return data

    def decline(self, a: Assignment, reason: DeclineReason, detail: str) -> None:
        """Tell the server this device gives no update this round, and why: a decline at the
        device's own update key (``sfl.core.decline``); then heartbeat."""
        body = Decline(
            round=a.round,
            client_id=self.settings.client_id,
            base_version=a.base_version,
            reason=reason,
            detail=detail,
        ).encode()
        with aws_call("s3", "PutObject"):
            self.aws.s3.put_object(
                Bucket=self.settings.updates_bucket,
                Key=layout.update_key(self.settings.client_id, a.round),
                Body=body,
            )
        self.rounds_declined += 1
        self.heartbeat()
        # The message carries the fields: Greengrass logs the text, not `extra`.
        logger.warning(
            "round %d declined (%s): %s",
            a.round,
            reason.value,
            clean_detail(detail),
            extra={"client_id": self.settings.client_id, "round": a.round, "reason": reason.value},
        )

    def upload(self, a: Assignment, update: bytes, started: float) -> None:
        """Put the encoded update under the key naming this client and round, then heartbeat.
        ``started`` is when the client picked the round up (for the turnaround it logs)."""
        with aws_call("s3", "PutObject"):
            self.aws.s3.put_object(
                Bucket=self.settings.updates_bucket,
                Key=layout.update_key(self.settings.client_id, a.round),
                Body=update,
            )
        turnaround = self.clock() - started
        self.rounds_answered += 1
        self.heartbeat()
        logger.info(
            "update uploaded",
            extra={
                "client_id": self.settings.client_id,
                "round": a.round,
                "bytes": len(update),
                "turnaround_s": round(turnaround, 3),
            },
        )


def _snapshot(state: Mapping[str, Any]) -> dict[str, Any]:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def _task_step(step: str, call: Callable[..., _Result], *args: Any) -> _Result:
    """One call into the task's own code; whatever it raises costs this round's answer."""
    try:
        result = call(*args)
    except Exception as e:
        raise RoundDeclined(DeclineReason.TASK_FAILED, f"{step}: {type(e).__name__}: {e}") from e
    return result


def _reported_metrics(trained: Metrics, evaluated: Metrics) -> dict[str, float]:
    """The numbers the update reports; a task's NaN, Inf or non-number declines the round."""
    try:
        metrics = {
            "loss": float(evaluated.loss),
            "accuracy": float(evaluated.accuracy),
            "eval_examples": float(evaluated.num_examples),
            "train_loss": float(trained.loss),
        }
    except Exception as e:  # not a Metrics, or not numbers
        raise RoundDeclined(
            DeclineReason.TASK_FAILED, f"train/evaluate returned no metrics: {type(e).__name__}"
        ) from e
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise RoundDeclined(DeclineReason.NON_FINITE_LOSS, f"{', '.join(bad)} not finite")
    return metrics


def _signature(state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def _check_trained(state: Mapping[str, Any], reference: Mapping[str, Any]) -> None:
    """The trained model has the base model's names, shapes and dtypes, and finite values;
    else the round is declined (the averager would refuse it anyway, after the upload)."""
    import torch

    found = _signature(state)
    if found != reference:
        names = sorted(set(found) ^ set(reference)) or sorted(
            n for n in found if found[n] != reference[n]
        )
        raise RoundDeclined(
            DeclineReason.WRONG_SHAPE,
            f"{len(names)} tensor(s) differ from the base model, e.g. {names[0][:64]!r}",
        )
    for name, t in state.items():
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise RoundDeclined(
                DeclineReason.NON_FINITE_MODEL, f"tensor {name[:64]!r} holds NaN/Inf"
            )
