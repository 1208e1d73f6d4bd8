"""The client loop: heartbeat, poll the assignment cheaply, answer rounds it was picked for."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from edge_client.settings import ClientSettings
from sfl import codec, layout
from sfl.aws import AwsClients, error_code, is_not_found
from sfl.registry import ClientRegistry, update_ewma
from sfl.tasks.base import ClientData, TrainConfig, TrainingTask

logger = logging.getLogger(__name__)


class RoundInterrupted(Exception):
    """Training was stopped (SIGTERM) before the update was uploaded."""


@dataclass(frozen=True)
class Assignment:
    round: int
    status: str
    base_version: int
    model_key: str
    selected: frozenset[str]
    deadline_at: float
    train_config: dict[str, Any]

    @classmethod
    def from_json(cls, body: bytes) -> Assignment:
        d = json.loads(body)
        return cls(
            round=int(d["round"]),
            status=str(d["status"]),
            base_version=int(d["base_version"]),
            model_key=str(d["model_key"]),
            selected=frozenset(d["selected"]),
            deadline_at=float(d["deadline_at"]),
            train_config=dict(d["train_config"]),
        )


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
    ) -> None:
        self.settings = settings
        self.aws = aws
        self.task = task
        self.stop = stop or threading.Event()
        self.clock = clock
        self.hooks = hooks or RoundHooks()
        self.registry = ClientRegistry(aws.dynamodb, settings.clients_table)
        self.ewma: float | None = None
        self.rounds_answered = 0
        self._assignment_etag: str | None = None
        self._last_round_seen = 0  # rounds up to this one are never answered (again)
        self._next_heartbeat = 0.0
        self._data: ClientData | None = None

    # --- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Poll and answer until stopped (or max_rounds answered). Returns an exit code."""
        self._data = self.task.load_client_data(self.settings.data_dir)
        try:  # a restarted device keeps its turnaround history
            known = self.registry.get(self.settings.client_id)
            if known is not None and self.ewma is None:
                self.ewma = known.ewma_turnaround
        except (ClientError, BotoCoreError) as e:
            logger.warning("registry unreachable at start", extra={"error": str(e)})
        logger.info(
            "client started",
            extra={"client_id": self.settings.client_id, "train_examples": len(self._data.train)},
        )
        backoff = self.settings.poll_seconds
        while not self.stop.is_set():
            try:
                if self.clock() >= self._next_heartbeat:
                    self.heartbeat()
                assignment = self.poll()
                if assignment is not None and self._should_answer(assignment):
                    self.answer(assignment)
                    if self._done():
                        break
                    continue  # poll again right away: the next round may already be open
                backoff = self.settings.poll_seconds
            except RoundInterrupted:
                break
            except (ClientError, BotoCoreError) as e:
                backoff = min(backoff * 2, self.settings.max_backoff_seconds)
                logger.warning(
                    "AWS call failed; backing off",
                    extra={
                        "client_id": self.settings.client_id,
                        "error": str(e),
                        "backoff_s": backoff,
                    },
                )
            # jitter keeps a fleet from polling in lockstep
            self.stop.wait(backoff * random.uniform(0.8, 1.2))
        logger.info("client stopped", extra={"client_id": self.settings.client_id})
        return 0

    def _done(self) -> bool:
        return (
            self.settings.max_rounds is not None
            and self.rounds_answered >= self.settings.max_rounds
        )

    def heartbeat(self, *, answered_round: bool = False) -> None:
        self.registry.heartbeat(
            self.settings.client_id,
            now=self.clock(),
            active_window_seconds=self.settings.active_window_seconds,
            ewma_turnaround=self.ewma,
            answered_round=answered_round,
        )
        self._next_heartbeat = self.clock() + self.settings.heartbeat_seconds

    def poll(self) -> Assignment | None:
        """Conditional GET of the assignment: a 304 costs almost nothing."""
        kwargs: dict[str, Any] = {
            "Bucket": self.settings.models_bucket,
            "Key": layout.ASSIGNMENT_KEY,
        }
        if self._assignment_etag:
            kwargs["IfNoneMatch"] = self._assignment_etag
        try:
            obj = self.aws.s3.get_object(**kwargs)
        except ClientError as e:
            if error_code(e) in {"304", "NotModified"} or is_not_found(e):
                return None
            raise
        self._assignment_etag = obj["ETag"]
        try:
            return Assignment.from_json(obj["Body"].read())
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("assignment unreadable", extra={"error": str(e)})
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

    def answer(self, a: Assignment) -> None:
        """Download the base model, train, evaluate locally, upload the update."""
        assert self._data is not None
        cid = self.settings.client_id
        log = {"client_id": cid, "round": a.round}
        logger.info("round picked up", extra=log)
        started = self.clock()
        body = self.aws.s3.get_object(Bucket=self.settings.models_bucket, Key=a.model_key)[
            "Body"
        ].read()
        model = self.task.build_model()
        model.load_state_dict(codec.decode(body))
        downloaded = self.clock()
        cfg = a.train_config
        train_config = TrainConfig(
            local_epochs=int(cfg["local_epochs"]),
            lr=float(cfg["lr"]),
            batch_size=int(cfg["batch_size"]),
            seed=int(cfg.get("seed", 0)),
        )
        train_metrics = self.task.train(model, self._data.train, train_config, self.stop.is_set)
        if self.stop.is_set():
            raise RoundInterrupted
        trained = self.clock()
        local_eval = self.task.evaluate(model, self._data.eval)
        evaluated = self.clock()
        self.hooks.before_upload(a, trained - downloaded)
        if self.stop.is_set():
            raise RoundInterrupted
        metadata = codec.UpdateMetadata(
            round=a.round,
            client_id=cid,
            base_version=a.base_version,
            num_examples=len(self._data.train),
            metrics={
                "loss": local_eval.loss,
                "accuracy": local_eval.accuracy,
                "eval_examples": float(local_eval.num_examples),
                "train_loss": train_metrics.loss,
            },
            timings={
                "download_s": downloaded - started,
                "train_s": trained - downloaded,
                "eval_s": evaluated - trained,
            },
            bytes_down=len(body),
            upload_started_at=self.clock(),
        )
        update = codec.encode(model.state_dict(), metadata.to_header())
        self.aws.s3.put_object(
            Bucket=self.settings.updates_bucket, Key=layout.update_key(cid, a.round), Body=update
        )
        turnaround = self.clock() - started
        self.ewma = update_ewma(self.ewma, turnaround, self.settings.ewma_b)
        self.rounds_answered += 1
        self.heartbeat(answered_round=True)
        logger.info(
            "update uploaded",
            extra={
                **log,
                "bytes": len(update),
                "turnaround_s": round(turnaround, 3),
                "ewma_s": round(self.ewma, 3),
            },
        )
