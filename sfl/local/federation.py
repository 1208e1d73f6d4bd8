"""One federation on this machine, shared by ``sfl simulate``, ``sfl loadtest``, ``sfl local up``.

``with LocalFederation(config) as federation:`` starts the local AWS endpoint (moto's server),
creates the stack's tables and buckets from ``sfl.core.resources``, sets the handlers' Lambda
environment, loads both handlers in-process, delivers S3 events to the averager as Lambda
would, and writes model version 0. Each command adds only its own part (real clients,
virtual clients, serving until stopped); leaving the block stops everything it started.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from edge_client.notices import RoundNotices
from edge_client.settings import ClientSettings
from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.events import BOOTSTRAP_EVENT, TICK_EVENT
from sfl.core.notices import RoundNotice, notice_topic
from sfl.core.resources import ROUNDS_TABLE, ResourceNames
from sfl.local.broker import LocalIotCore
from sfl.local.dispatcher import S3EventDispatcher
from sfl.local.emulator import (
    LocalAws,
    LocalDeployment,
    lambda_environment,
    provision,
    table_resource,
)
from sfl.local.lambdas import LocalFunction
from sfl.state.aws import AwsClients
from sfl.state.rounds import RoundState, RoundStore

#: The event an EventBridge schedule rule sends its target.
SCHEDULED_EVENT = {"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}
#: What local mode calls its deployment in the notice topic (a stack's name on AWS).
LOCAL_DEPLOYMENT = "local"
#: Statuses a round ends in.
FINISHED = frozenset(s.value for s in RoundState if s.finished)


def handler_environment(
    aws: LocalAws, names: ResourceNames, config: FederationConfig, *, log_file: bool = False
) -> dict[str, str]:
    """The process environment the local handlers run in: the endpoint and its credentials,
    the resource names and the configuration as the stack sets them; metrics off. Their log
    lines go to a file at the level they have on AWS (INFO), else only warnings, so the
    command's own output stays readable."""
    return {
        **aws.env(),
        **names.to_env(),
        **config.to_env(),
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "INFO" if log_file else "WARNING",
    }


def round_key(experiment: str, number: int) -> dict[str, Any]:
    """A round item's key in the low-level AttributeValue form, from the table's definition."""
    sort_key = ROUNDS_TABLE.sort_key
    assert sort_key is not None
    return {
        ROUNDS_TABLE.partition_key.name: {"S": experiment},
        sort_key.name: {"N": str(number)},
    }


@dataclass(frozen=True)
class RoundWait:
    """How waiting for a round ended."""

    status: str  # the last status read ("OPEN" before the item is there)
    left_open_at: float | None  # ``time.perf_counter()`` when it was first seen past OPEN

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class LocalFederation:
    """The endpoint, the stack's resources, both handlers and the S3-event delivery.

    ``tick_seconds`` is the averager's watchdog tick (an EventBridge rule on AWS), run by
    ``wait_for_round`` or by ``start_schedule``. ``aws``: an endpoint already running (a test
    session's), used and left running; by default the federation starts and stops its own.
    """

    # Inside the ``with`` block:
    deployment: LocalDeployment
    initiator: LocalFunction
    averager: LocalFunction
    dispatcher: S3EventDispatcher
    clients: AwsClients  # S3 and DynamoDB clients for the caller's own reads and writes
    rounds: RoundStore

    def __init__(
        self,
        config: FederationConfig,
        *,
        tick_seconds: float = 1.0,
        log_path: Path | None = None,
        averager_concurrency: int = 4,
        extra_deliveries: int = 0,
        drop_rate: float = 0.0,
        seed: int = 0,
        aws: LocalAws | None = None,
        push: bool = True,
    ) -> None:
        """``log_path``: where the handlers' JSON log lines go (None: stdout). The delivery
        options are ``S3EventDispatcher``'s. ``push``: play IoT Core with an MQTT broker, the
        initiator pushing round notices to it (``round_notices`` subscribes a client)."""
        self.config = config
        self.tick_seconds = tick_seconds
        self._log_path = log_path
        self._delivery: dict[str, Any] = {
            "concurrency": averager_concurrency,
            "extra_deliveries": extra_deliveries,
            "drop_rate": drop_rate,
            "seed": seed,
        }
        self._owns_aws = aws is None
        self.aws = aws if aws is not None else LocalAws()
        self._exit = ExitStack()
        self._stop = threading.Event()
        self._schedule: threading.Thread | None = None
        self.notice_topic = notice_topic(LOCAL_DEPLOYMENT, config.experiment)
        self.iot_core: LocalIotCore | None = LocalIotCore() if push else None

    # -- starting and stopping ---------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        with ExitStack() as started:
            if self._owns_aws:
                started.enter_context(self.aws)
            self.deployment = provision(self.aws)
            started.enter_context(
                lambda_environment(
                    handler_environment(
                        self.aws, self.names, self.config, log_file=self._log_path is not None
                    )
                )
            )
            self.initiator = LocalFunction("initiator", log_path=self._log_path)
            if self.iot_core is not None:
                started.enter_context(self.iot_core)
                self._push_through(self.iot_core, started)
            self.averager = LocalFunction("averager", log_path=self._log_path)
            self.averager.invoke(BOOTSTRAP_EVENT)
            self.clients = self.aws.clients()
            self.rounds = RoundStore(self.clients.dynamodb, self.names.rounds_table)
            self.dispatcher = S3EventDispatcher(
                self.aws.client("sqs"),
                self.deployment.queue_url,
                self.averager.invoke,
                **self._delivery,
            ).start()
            started.callback(self.dispatcher.stop)
            self._exit = started.pop_all()
        return self

    def _push_through(self, iot_core: LocalIotCore, started: ExitStack) -> None:
        """The initiator publishes its notices to the local broker while the federation runs
        (the handler module is shared by the process: put back what it had on the way out).

        A round started by an operator's ``sfl start-round`` runs the initiator in the
        operator's process, which on AWS invokes the function (and so publishes) but locally
        has no way to this broker: for a round the federation's own initiator did not announce,
        the federation publishes the notice once the assignment is written, as the deployed
        initiator would have."""
        module = self.initiator.module
        deployed = module.notice_publisher
        publish = iot_core.publisher(self.notice_topic)
        announced: set[tuple[str, int]] = set()

        def publisher(notice: RoundNotice) -> None:
            announced.add((notice.experiment, notice.round))
            publish(notice)

        setattr(module, "notice_publisher", lambda: publisher)  # noqa: B010
        started.callback(setattr, module, "notice_publisher", deployed)
        watcher = threading.Thread(
            target=self._announce_unannounced,
            args=(publisher, announced),
            name="round-notices",
            daemon=True,
        )
        watcher.start()
        started.callback(watcher.join, 10)
        started.callback(self._stop.set)

    def _announce_unannounced(
        self, publisher: Callable[[RoundNotice], None], announced: set[tuple[str, int]]
    ) -> None:
        """Publish the notice of each newly written rounds-mode assignment not announced yet."""
        pause = self.aws.feed.waiter(self.names.models_bucket, layout.ASSIGNMENT_KEY, self._stop)
        s3 = self.aws.clients().s3
        while not self._stop.is_set():
            pause(1.0)
            # The federation's own initiator publishes right after its write: let it first.
            if self._stop.wait(0.5):
                return
            try:
                body = s3.get_object(Bucket=self.names.models_bucket, Key=layout.ASSIGNMENT_KEY)[
                    "Body"
                ].read()
                written = json.loads(body)
                notice = RoundNotice(
                    str(written["experiment"]), int(written["round"]), int(written["base_version"])
                )
            except (BotoCoreError, ClientError, KeyError, TypeError, ValueError):
                continue  # no assignment yet, a buffered one, or the endpoint stopping
            if written.get("mode") == "buffered" or written.get("status") != "OPEN":
                continue
            if (notice.experiment, notice.round) not in announced:
                publisher(notice)

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        """Stop the schedule, the event delivery, the handlers' environment and (if it is the
        federation's own) the endpoint. Stop your clients first: they need the endpoint."""
        self._stop.set()
        if self._schedule is not None:
            self._schedule.join(timeout=30)
            self._schedule = None
        self._exit.close()

    def stop_events(self) -> None:
        """Stop delivering S3 events (before reading a round's final record); leaving the
        block does it too."""
        self.dispatcher.stop()

    # -- what is running ---------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return self.aws.endpoint_url

    @property
    def names(self) -> ResourceNames:
        return self.deployment.names

    def operator_env(self) -> dict[str, str]:
        """What an operator's shell needs to run ``sfl`` commands against this federation."""
        env = self.aws.env()
        return {k: env[k] for k in env if k.startswith("AWS_")}

    # -- the rounds --------------------------------------------------------------------------

    def start_round(self) -> dict[str, Any]:
        """Invoke the initiator now (a round chained after the last one); its answer."""
        result: dict[str, Any] = self.initiator.invoke({"source": "sfl.local"})
        return result

    def tick(self) -> bool:
        """One watchdog tick, invoked as EventBridge does (a failure is counted on
        ``averager.scheduled_failures``, not raised); whether it succeeded."""
        return self.averager.invoke_scheduled(TICK_EVENT)

    def start_schedule(self, *, round_seconds: float) -> None:
        """EventBridge's two rules, until the federation stops: the watchdog tick every
        ``tick_seconds`` and the initiator every ``round_seconds``."""
        self._schedule = threading.Thread(
            target=self._run_schedule, args=(round_seconds,), name="schedule", daemon=True
        )
        self._schedule.start()

    def _run_schedule(self, round_seconds: float) -> None:
        next_start = time.time() + round_seconds
        while not self._stop.wait(self.tick_seconds):
            self.tick()
            if time.time() >= next_start:
                self.initiator.invoke_scheduled(SCHEDULED_EVENT)
                next_start = time.time() + round_seconds

    def wait_for_round(
        self, number: int, *, timeout: float, min_read_interval: float = 0.0
    ) -> RoundWait:
        """Wait up to ``timeout`` s for round ``number`` to finish, ticking the watchdog
        every ``tick_seconds`` on our own clock.

        The round's status alone is read (the item holds every answer) when the rounds table
        was written, at most every ``min_read_interval`` s, and at least every tick."""
        table = self.names.rounds_table
        resource = table_resource(table)
        next_tick = time.time() + self.tick_seconds
        hard_stop = time.time() + timeout
        status = RoundState.OPEN.value
        left_open_at: float | None = None
        seen = self.aws.feed.writes(resource, "")
        while time.time() < hard_stop:
            read_at = time.perf_counter()
            status = self.round_status(number) or RoundState.OPEN.value
            if status != RoundState.OPEN.value and left_open_at is None:
                left_open_at = time.perf_counter()
            if status in FINISHED:
                break
            if time.time() >= next_tick:
                self.tick()
                next_tick = time.time() + self.tick_seconds
            seen = self.aws.feed.wait(resource, "", seen, max(0.0, next_tick - time.time()))
            rest = min_read_interval - (time.perf_counter() - read_at)
            if rest > 0:
                time.sleep(rest)
        return RoundWait(status=status, left_open_at=left_open_at)

    def round_status(self, number: int) -> str | None:
        """The round's status attribute only: a consistent read that skips the answers."""
        item = self.clients.dynamodb.get_item(
            TableName=self.names.rounds_table,
            Key=round_key(self.config.experiment, number),
            ConsistentRead=True,
            ProjectionExpression="#s",
            ExpressionAttributeNames={"#s": "status"},
        ).get("Item")
        return item["status"]["S"] if item and "status" in item else None

    # -- the devices -------------------------------------------------------------------------

    def client_settings(
        self,
        client_id: str,
        *,
        data_dir: Path,
        task: str | None = None,
        poll_seconds: float | None = None,
    ) -> ClientSettings:
        """A device's settings as the stack's component configuration gives them: this
        federation's names and timings (``task`` and ``poll_seconds`` default to the config's;
        the task's parameters are the config's)."""
        return ClientSettings(
            client_id=client_id,
            models_bucket=self.names.models_bucket,
            updates_bucket=self.names.updates_bucket,
            clients_table=self.names.clients_table,
            data_dir=data_dir,
            task=self.config.task if task is None else task,
            task_params=self.config.task_params,
            poll_seconds=self.config.poll_seconds if poll_seconds is None else poll_seconds,
            heartbeat_seconds=self.config.heartbeat_seconds,
            active_window_seconds=self.config.active_window_seconds,
            notice_topic=self.notice_topic if self.iot_core is not None else "",
            push_poll_seconds=self.config.push_poll_seconds,
            push_heartbeat_seconds=self.config.push_heartbeat_seconds,
        )

    def round_notices(self, settings: ClientSettings) -> RoundNotices | None:
        """One in-process client's subscription to round notices, through its own MQTT
        connection to the local broker (None without push)."""
        if self.iot_core is None or not settings.notice_topic:
            return None
        return RoundNotices(
            settings.notice_topic, self.iot_core.subscribe, retry_seconds=settings.push_poll_seconds
        )

    def assignment_wake_up(self, stop: threading.Event | None = None) -> Callable[[float], None]:
        """A pause for one in-process client that ends when the assignment is written (see
        ``ChangeFeed.waiter``), so a local client need not poll tightly."""
        return self.aws.feed.waiter(self.names.models_bucket, layout.ASSIGNMENT_KEY, stop)
