"""``sfl local up``: a running federation on this machine for the operator's commands.

The same parts as ``sfl simulate`` (moto's server, the resources from ``sfl.core.resources``, both
Lambda handlers in-process, real ``EdgeClient`` loops), run on a schedule until stopped
instead of for a fixed number of rounds. It registers what ``cdk deploy`` would leave behind
for an operator to find: the two functions (with the deployed configuration as their
environment), the alarms, and a CloudFormation stack whose outputs name them all, so every
``sfl`` operations command runs unchanged against ``--endpoint``.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_client.client import EdgeClient
from edge_client.settings import ClientSettings
from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.events import BOOTSTRAP_EVENT, TICK_EVENT
from sfl.learning.splits import default_client_ids, write_client_splits
from sfl.learning.tasks import load_task
from sfl.local.dispatcher import S3EventDispatcher
from sfl.local.emulator import LocalAws, LocalDeployment, lambda_environment, provision
from sfl.local.lambdas import LocalFunction
from sfl.ops.federation import (
    ALARMS_OUTPUT,
    AVERAGER_OUTPUT,
    DEFAULT_STACK,
    INITIATOR_OUTPUT,
    LOCAL_OUTPUT,
    OUTPUT_NAMES,
)
from sfl.server.evaluation import encode_eval_set

#: The stack's alarms (``infra.stack.FederationStack._alarms``), by logical id.
ALARM_IDS = (
    "InitiatorErrorsAlarm",
    "AveragerErrorsAlarm",
    "FailedEventsAlarm",
    "OverdueRoundAlarm",
)
SCHEDULED_EVENT = {"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}


@dataclass(frozen=True)
class FleetOptions:
    out: Path = Path("runs/local")
    clients: int = 4
    task: str = "digits"
    partition: str = "iid"
    seed: int = 0
    stack: str = DEFAULT_STACK
    schedule_seconds: float = 2.0  # the initiator's schedule (EventBridge's, in minutes)
    tick_seconds: float = 1.0  # the averager's watchdog tick
    eval_data: bool = True  # upload the task's test split as the held-out set
    config_overrides: tuple[tuple[str, str], ...] = ()
    client_slowness: float = 0.0  # extra seconds each client waits before training
    defaults: dict[str, Any] = field(
        default_factory=lambda: {
            "local_epochs": 1,
            "poll_seconds": 0.2,
            "heartbeat_seconds": 5,
            "round_soft_deadline_seconds": 20,
            "round_deadline_seconds": 40,
            "aggregation_lease_seconds": 10,
        }
    )

    def federation_config(self) -> FederationConfig:
        base = FederationConfig(task=self.task, seed=self.seed, **self.defaults)
        return base.with_overrides(dict(self.config_overrides))


class LocalFleet:
    """``with LocalFleet(options) as fleet:`` runs until the block ends."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.config = options.federation_config()
        self._aws = LocalAws()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._env: Any = None
        self._dispatcher: S3EventDispatcher | None = None
        self.deployment: LocalDeployment | None = None
        self.initiator: LocalFunction | None = None
        self.averager: LocalFunction | None = None

    @property
    def endpoint_url(self) -> str:
        return self._aws.endpoint_url

    def client_env(self) -> dict[str, str]:
        """What an operator's shell needs to run ``sfl`` commands against this fleet."""
        env = self._aws.env()
        return {k: env[k] for k in env if k.startswith("AWS_")}

    def __enter__(self) -> LocalFleet:
        options = self.options
        task = load_task(options.task)
        client_ids = default_client_ids(options.clients)
        write_client_splits(
            task, options.out / "data", options.clients, options.partition, options.seed,
            client_ids=client_ids,
        )  # fmt: skip
        self._aws.__enter__()
        try:
            self._start(task, client_ids)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, task: Any, client_ids: list[str]) -> None:
        options = self.options
        aws = self._aws
        self.deployment = deployment = provision(aws)
        names = deployment.names
        functions = self._register_functions(names.to_env() | self.config.to_env())
        self._register_stack(functions)
        env = {
            **aws.env(),
            **names.to_env(),
            **self.config.to_env(),
            "POWERTOOLS_METRICS_DISABLED": "true",
            "POWERTOOLS_LOG_LEVEL": "WARNING",
        }
        self._env = lambda_environment(env)
        self._env.__enter__()
        log_path = options.out / "lambda-logs.jsonl"
        self.initiator = LocalFunction("initiator", log_path=log_path)
        self.averager = LocalFunction("averager", log_path=log_path)
        self.averager.invoke(BOOTSTRAP_EVENT)
        control = aws.clients()
        if options.eval_data:
            control.s3.put_object(
                Bucket=names.models_bucket,
                Key=layout.EVAL_DATA_KEY,
                Body=encode_eval_set(task.load_central_data().test, task=options.task),
            )
        self._dispatcher = S3EventDispatcher(
            aws.client("sqs"), deployment.queue_url, self.averager.invoke, seed=options.seed
        ).start()
        for cid in client_ids:
            settings = ClientSettings(
                client_id=cid,
                models_bucket=names.models_bucket,
                updates_bucket=names.updates_bucket,
                clients_table=names.clients_table,
                data_dir=options.out / "data" / cid,
                task=options.task,
                poll_seconds=self.config.poll_seconds,
                heartbeat_seconds=self.config.heartbeat_seconds,
                active_window_seconds=self.config.active_window_seconds,
            )
            self._spawn(cid, self._run_client, settings, task)
        self._spawn("schedule", self._schedule)

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run_client(self, settings: ClientSettings, task: Any) -> None:
        # Woken when the assignment is written; the configured poll stays as the fallback.
        wake = self._aws.feed.waiter(settings.models_bucket, layout.ASSIGNMENT_KEY, self._stop)
        while not self._stop.is_set():
            try:
                EdgeClient(settings, self._aws.clients(), task, stop=self._stop, wake=wake).run()
                return
            except Exception:  # restarted like a Greengrass component
                self._stop.wait(1.0)

    def _schedule(self) -> None:
        """EventBridge's two rules: the initiator's schedule and the averager's tick."""
        assert self.initiator is not None and self.averager is not None
        next_start = time.time() + self.options.schedule_seconds
        while not self._stop.wait(self.options.tick_seconds):
            self.averager.invoke_scheduled(TICK_EVENT)
            if time.time() >= next_start:
                self.initiator.invoke_scheduled(SCHEDULED_EVENT)
                next_start = time.time() + self.options.schedule_seconds

    def _register_functions(self, environment: dict[str, str]) -> dict[str, str]:
        """The two functions as the Lambda API shows them (their code runs in-process here;
        moto's Lambda would need Docker to invoke them)."""
        iam = self._aws.client("iam")
        role = iam.create_role(
            RoleName=f"{self.options.stack}-local-role",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "lambda.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )["Role"]["Arn"]
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("README.txt", "sfl local mode runs lambdas/*/handler.py in-process\n")
        lam = self._aws.client("lambda")
        created = {}
        for output, name in ((INITIATOR_OUTPUT, "initiator"), (AVERAGER_OUTPUT, "averager")):
            function = f"{self.options.stack}-{name}"
            lam.create_function(
                FunctionName=function,
                Runtime="python3.12",
                Role=role,
                Handler="handler.lambda_handler",
                Code={"ZipFile": archive.getvalue()},
                Environment={"Variables": environment},
            )
            created[output] = function
        return created

    def _register_stack(self, functions: dict[str, str]) -> None:
        assert self.deployment is not None
        names = self.deployment.names
        stack = self.options.stack
        cloudwatch = self._aws.client("cloudwatch")
        alarms = [f"{stack}-{alarm_id}" for alarm_id in ALARM_IDS]
        for alarm in alarms:
            cloudwatch.put_metric_alarm(
                AlarmName=alarm,
                Namespace="AWS/Lambda",
                MetricName="Errors",
                Statistic="Sum",
                Period=300,
                EvaluationPeriods=1,
                Threshold=1,
                ComparisonOperator="GreaterThanOrEqualToThreshold",
            )
        outputs = {
            **{output: getattr(names, attr) for attr, output in OUTPUT_NAMES.items()},
            **functions,
            ALARMS_OUTPUT: ",".join(alarms),
            LOCAL_OUTPUT: "true",
        }
        template = {
            "Description": "sfl local mode: what 'cdk deploy' would leave for the operator",
            "Resources": {
                "LocalMode": {
                    "Type": "AWS::SSM::Parameter",
                    "Properties": {
                        "Name": f"/{stack}/local-mode",
                        "Type": "String",
                        "Value": "sfl local up",
                    },
                }
            },
            "Outputs": {k: {"Value": v} for k, v in outputs.items()},
        }
        self._aws.client("cloudformation").create_stack(
            StackName=stack, TemplateBody=json.dumps(template)
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._aws.feed.wake_all()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._dispatcher is not None:
            self._dispatcher.stop()
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None
        self._aws.__exit__()
