"""``sfl local up``: a running federation on this machine for the operator's commands.

The same ``LocalFederation`` as ``sfl simulate`` (moto's server, the resources from
``sfl.core.resources``, both Lambda handlers in-process) with real ``EdgeClient`` loops, run
on a schedule until stopped instead of for a fixed number of rounds. It registers what
``cdk deploy`` would leave behind for an operator to find: the two functions (with the
deployed configuration as their environment), the alarms, and a CloudFormation stack whose
outputs name them all, so every ``sfl`` operations command runs unchanged against
``--endpoint``.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_client.client import EdgeClient
from edge_client.settings import ClientSettings
from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.learning.splits import default_client_ids, write_client_splits
from sfl.learning.tasks import configured_task
from sfl.local.federation import LocalFederation
from sfl.ops.defaults import DEFAULT_STACK
from sfl.ops.federation import (
    ALARMS_OUTPUT,
    AVERAGER_OUTPUT,
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
        overrides = dict(self.config_overrides)
        # The task and its parameters are checked together: both go in at once.
        params = overrides.pop("task_params", "{}")
        base = FederationConfig(task=self.task, task_params=params, seed=self.seed, **self.defaults)
        return base.with_overrides(overrides)


class LocalFleet:
    """``with LocalFleet(options) as fleet:`` runs until the block ends."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.config = options.federation_config()
        self.federation = LocalFederation(
            self.config,
            tick_seconds=options.tick_seconds,
            log_path=options.out / "lambda-logs.jsonl",
            seed=options.seed,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def endpoint_url(self) -> str:
        return self.federation.endpoint_url

    def client_env(self) -> dict[str, str]:
        """What an operator's shell needs to run ``sfl`` commands against this fleet."""
        return self.federation.operator_env()

    def __enter__(self) -> LocalFleet:
        options = self.options
        task = configured_task(self.config)
        client_ids = default_client_ids(options.clients)
        write_client_splits(
            task, options.out / "data", options.clients, options.partition, options.seed,
            client_ids=client_ids,
        )  # fmt: skip
        self.federation.__enter__()
        try:
            self._start(task, client_ids)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, task: Any, client_ids: list[str]) -> None:
        options = self.options
        federation = self.federation
        names = federation.names
        functions = self._register_functions(names.to_env() | self.config.to_env())
        self._register_stack(functions)
        if options.eval_data:
            federation.clients.s3.put_object(
                Bucket=names.models_bucket,
                Key=layout.EVAL_DATA_KEY,
                Body=encode_eval_set(task.load_central_data().test, task=options.task),
            )
        for cid in client_ids:
            settings = federation.client_settings(
                cid, data_dir=options.out / "data" / cid, task=options.task
            )
            thread = threading.Thread(
                target=self._run_client, args=(settings, task), name=cid, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        federation.start_schedule(round_seconds=options.schedule_seconds)

    def _run_client(self, settings: ClientSettings, task: Any) -> None:
        # Woken by the round notices the initiator pushes to the local broker, as a device is
        # through Greengrass IPC; while not subscribed, when the assignment is written.
        wake = self.federation.assignment_wake_up(self._stop)
        while not self._stop.is_set():
            try:
                client = EdgeClient(
                    settings,
                    self.federation.aws.clients(),
                    task,
                    stop=self._stop,
                    wake=wake,
                    notices=self.federation.round_notices(settings),
                )
                client.run()
                return
            except Exception:  # restarted like a Greengrass component
                self._stop.wait(1.0)

    def _register_functions(self, environment: dict[str, str]) -> dict[str, str]:
        """The two functions as the Lambda API shows them (their code runs in-process here;
        moto's Lambda would need Docker to invoke them)."""
        iam = self.federation.aws.client("iam")
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
        lam = self.federation.aws.client("lambda")
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
        names = self.federation.names
        stack = self.options.stack
        cloudwatch = self.federation.aws.client("cloudwatch")
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
        self.federation.aws.client("cloudformation").create_stack(
            StackName=stack, TemplateBody=json.dumps(template)
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self.federation.aws.feed.wake_all()
        for thread in self._threads:
            thread.join(timeout=30)
        self.federation.__exit__()
