"""What runs the rounds: the initiator (zip), the averager (container image), their schedule.

Both functions log to their own log groups with a retention, send failed asynchronous
invocations to one failure queue, trace to X-Ray (Powertools Tracer, annotated by round:
``sfl.server.runtime``), and run with roles that start empty: the stack grants each the
exact actions it needs on the exact resources.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsii
from aws_cdk import AssetHashType, BundlingOptions, Duration, RemovalPolicy, Size, Stage
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from aws_cdk import custom_resources as cr
from constructs import Construct

from infra.bundling import InitiatorBundling
from infra.compliance import acknowledge_nag, cfn_resource, skip_checkov
from sfl.build.app_code import AVERAGER, INITIATOR, NO_APP, AppCode
from sfl.build.averager_image import stage_build_context
from sfl.core import lambda_shapes
from sfl.core.events import BOOTSTRAP_EVENT, TICK_EVENT
from sfl.server.runtime import (
    AVERAGER_SERVICE,
    INITIATOR_FUNCTION_ENV,
    INITIATOR_SERVICE,
    METRICS_NAMESPACE,
    SHARD_FUNCTION_ENV,
)

SHARD_HANDLER = "handler.shard_handler"

INITIATOR_DIR = Path("lambdas/initiator")
#: The averager image's build context is staged here, beside the cloud assembly.
AVERAGER_CONTEXT_DIR = "sfl-averager-image"
CORE_PACKAGE = "sfl"

_RUNTIMES = {
    "3.12": lambda_.Runtime.PYTHON_3_12,
    "3.13": lambda_.Runtime.PYTHON_3_13,
    "3.14": lambda_.Runtime.PYTHON_3_14,
}
# Lambda's architecture names (sfl.core.lambda_shapes) -> CDK's.
_ARCHITECTURES = {"arm64": lambda_.Architecture.ARM_64, "x86_64": lambda_.Architecture.X86_64}


@dataclass(frozen=True)
class FunctionSettings:
    memory_mb: int
    timeout_seconds: int
    reserved_concurrency: int  # 0: draw from the account's unreserved pool
    ephemeral_mib: int | None = None  # /tmp; None: Lambda's default (512 MiB)


class FederationRounds(Construct):
    """The initiator and averager Lambdas, the schedule rule, the failure queue, the bootstrap.

    Attributes: ``initiator``, ``averager``, ``initiator_log_group``, ``averager_log_group``,
    ``schedule``, ``failure_queue``, ``initial_model``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        source_root: Path,
        app: AppCode = NO_APP,
        python_version: str,
        environment: Mapping[str, str],
        initiator: FunctionSettings,
        averager: FunctionSettings,
        schedule_minutes: int,
        shard: FunctionSettings | None = None,
        schedule_enabled: bool,
        log_retention_days: int,
    ) -> None:
        super().__init__(scope, construct_id)
        self._retention = log_retention(log_retention_days)

        self.failure_queue = sqs.Queue(
            self,
            "FailedInvocations",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(14),
            removal_policy=RemovalPolicy.DESTROY,
        )
        skip_checkov(
            self.failure_queue,
            "CKV_AWS_27",
            "Encrypted at rest with SQS-managed keys (SSE-SQS). A KMS key would have to be a "
            "customer-managed one (EventBridge cannot deliver to a queue under the AWS-managed "
            "aws/sqs key), costing a monthly fee while the stack is idle.",
        )
        acknowledge_nag(
            cfn_resource(self.failure_queue),
            "AwsSolutions-SQS3",
            "This queue is itself the on-failure destination of both Lambdas and the dead-letter "
            "queue of the schedule's targets; nothing consumes it automatically, so it needs no "
            "DLQ of its own.",
        )

        self.initiator_log_group = self._log_group("InitiatorLogs")
        self.initiator = lambda_.Function(
            self,
            "Initiator",
            description="Starts a federated round: picks clients, writes the round and assignment.",
            runtime=_RUNTIMES[python_version],
            architecture=_ARCHITECTURES[lambda_shapes.INITIATOR.architecture],
            handler="handler.lambda_handler",
            code=lambda_.Code.from_asset(
                str(source_root / INITIATOR_DIR),
                asset_hash_type=AssetHashType.OUTPUT,
                bundling=BundlingOptions(
                    image=_RUNTIMES[python_version].bundling_image,  # unused: bundled locally
                    local=InitiatorBundling(
                        handler=source_root / INITIATOR_DIR / "handler.py",
                        requirements=source_root / INITIATOR_DIR / "requirements.txt",
                        source_root=source_root,
                        package=CORE_PACKAGE,
                        app=app.for_place(INITIATOR),
                        app_root=app.root,
                    ),
                ),
            ),
            **self._function_options(
                "Initiator", initiator, self.initiator_log_group, environment, INITIATOR_SERVICE
            ),
        )

        # The averager's image holds exactly the staged context: ours and the app's code.
        stage = Stage.of(self)
        if stage is None:
            raise ValueError("the rounds construct must be inside an App")
        averager_context = stage_build_context(
            Path(stage.outdir) / AVERAGER_CONTEXT_DIR,
            app=app.for_place(AVERAGER),
            source_root=source_root,
        )

        # Sums one shard of a large round (sfl.server.shards): the averager's image, another entry
        # point. A function of its own, so the averager invokes it without invoking itself
        # (a role granted its own function's ARN is a CloudFormation dependency cycle).
        self.shard: lambda_.DockerImageFunction | None = None
        self.shard_log_group: logs.LogGroup | None = None
        shard_environment: dict[str, str] = {}
        if shard is not None:
            self.shard_log_group = self._log_group("AveragerShardLogs")
            self.shard = lambda_.DockerImageFunction(
                self,
                "AveragerShard",
                description="Sums one shard of a large round's updates into a partial sum.",
                architecture=_ARCHITECTURES[lambda_shapes.AVERAGER.architecture],
                code=self._averager_image(averager_context, python_version, cmd=[SHARD_HANDLER]),
                **self._function_options(
                    "AveragerShard",
                    shard,
                    self.shard_log_group,
                    environment,
                    AVERAGER_SERVICE,
                ),
            )
            shard_environment = {SHARD_FUNCTION_ENV: self.shard.function_name}

        self.averager_log_group = self._log_group("AveragerLogs")
        self.averager = lambda_.DockerImageFunction(
            self,
            "Averager",
            description="Accepts client updates and aggregates a round into the next global model.",
            architecture=_ARCHITECTURES[lambda_shapes.AVERAGER.architecture],
            code=self._averager_image(averager_context, python_version),
            **self._function_options(
                "Averager",
                averager,
                self.averager_log_group,
                {
                    **environment,
                    INITIATOR_FUNCTION_ENV: self.initiator.function_name,
                    **shard_environment,
                },
                AVERAGER_SERVICE,
            ),
        )

        # One rule, two targets: the initiator starts a round when none is open, the averager
        # closes or abandons a round whose deadline passed. Neither function names the other
        # in its trigger, so the stack has no initiator <-> averager cycle.
        self.schedule = events.Rule(
            self,
            "Schedule",
            description="Federated-learning tick: start due rounds, enforce round deadlines.",
            schedule=events.Schedule.rate(Duration.minutes(schedule_minutes)),
            enabled=schedule_enabled,
        )
        for function in (self.initiator, self.averager):
            self.schedule.add_target(
                targets.LambdaFunction(
                    function,
                    event=events.RuleTargetInput.from_object(TICK_EVENT),
                    dead_letter_queue=self.failure_queue,
                    retry_attempts=2,
                    max_event_age=Duration.hours(1),
                )
            )

        for function, settings in ((self.initiator, initiator), (self.averager, averager)):
            _skip_function_checks(function, reserved=settings.reserved_concurrency > 0)
            _acknowledge_tracing_grant(function)
        if self.shard is not None and shard is not None:
            _skip_function_checks(self.shard, reserved=shard.reserved_concurrency > 0)
            _acknowledge_tracing_grant(self.shard)
        self.initial_model = self._bootstrap()

    def throttle_metrics(self, period: Duration) -> dict[str, cloudwatch.IMetric]:
        """Each function's ``Throttles`` (invocations refused for want of concurrency), by
        alarm name: the initiator, the averager, and the shard function when deployed."""
        functions = {"InitiatorThrottles": self.initiator, "AveragerThrottles": self.averager}
        if self.shard is not None:
            functions["AveragerShardThrottles"] = self.shard
        return {
            name: function.metric_throttles(period=period, statistic="Sum")
            for name, function in functions.items()
        }

    # --- pieces ------------------------------------------------------------------------------

    def _averager_image(
        self, context: Path, python_version: str, cmd: list[str] | None = None
    ) -> lambda_.DockerImageCode:
        """The averager's image (one asset, built once); ``cmd``: another entry point."""
        return lambda_.DockerImageCode.from_image_asset(
            str(context),
            platform=ecr_assets.Platform.LINUX_AMD64,
            build_args={"PYTHON_VERSION": python_version},
            cmd=cmd,
        )

    def _log_group(self, construct_id: str) -> logs.LogGroup:
        log_group = logs.LogGroup(
            self, construct_id, retention=self._retention, removal_policy=RemovalPolicy.DESTROY
        )
        skip_checkov(
            log_group,
            "CKV_AWS_158",
            "CloudWatch Logs encrypts every log group at rest; the logs hold round numbers, "
            "client ids and metrics, nothing that warrants a paid customer-managed key.",
        )
        return log_group

    def _function_options(
        self,
        name: str,
        settings: FunctionSettings,
        log_group: logs.LogGroup,
        environment: Mapping[str, str],
        service: str,
    ) -> dict[str, Any]:
        role = iam.Role(
            self,
            f"{name}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"Execution role of the {name.lower()}; the stack grants its access.",
        )
        # Logs only into its own group (not the managed policy's logs on every group).
        log_group.grant_write(role)
        return {
            "role": role,
            "memory_size": settings.memory_mb,
            "timeout": Duration.seconds(settings.timeout_seconds),
            "ephemeral_storage_size": None
            if settings.ephemeral_mib is None
            else Size.mebibytes(settings.ephemeral_mib),
            "reserved_concurrent_executions": settings.reserved_concurrency or None,
            "log_group": log_group,
            # X-Ray: Lambda samples and records each invocation, the handler's Tracer adds
            # subsegments (AWS calls, one per update) annotated by round. CDK grants the role
            # xray:PutTraceSegments and xray:PutTelemetryRecords on "*": those actions have no
            # resource-level permissions (Service Authorization Reference), so "*" is the only
            # resource they take.
            "tracing": lambda_.Tracing.ACTIVE,
            "environment": {
                **environment,
                "POWERTOOLS_SERVICE_NAME": service,
                "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
            },
            "on_failure": SendOnlyQueueDestination(self.failure_queue),
            "retry_attempts": 2,
            "max_event_age": Duration.hours(1),
        }

    def _bootstrap(self) -> cr.AwsCustomResource:
        """Ask the averager, once at deploy time, to write model version 0 if it is missing.

        Asynchronous: deploy does not wait for torch to start; Lambda retries a failed call
        twice, then it lands in the failure queue like any other.
        """
        log_group = self._log_group("InitialModelLogs")
        role = iam.Role(
            self,
            "InitialModelRole",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description="Deploy-time caller that asks the averager to write model version 0.",
        )
        log_group.grant_write(role)
        call = cr.AwsSdkCall(
            service="Lambda",
            action="invoke",
            parameters={
                "FunctionName": self.averager.function_name,
                "InvocationType": "Event",
                "Payload": json.dumps(BOOTSTRAP_EVENT),
            },
            physical_resource_id=cr.PhysicalResourceId.of("initial-model"),
        )
        resource = cr.AwsCustomResource(
            self,
            "InitialModel",
            on_create=call,
            on_update=call,
            policy=cr.AwsCustomResourcePolicy.from_statements(
                [
                    iam.PolicyStatement(
                        actions=["lambda:InvokeFunction"], resources=[self.averager.function_arn]
                    )
                ]
            ),
            role=role,
            log_group=log_group,
            install_latest_aws_sdk=False,
            timeout=Duration.minutes(1),
        )
        return resource


@jsii.implements(lambda_.IDestination)
class SendOnlyQueueDestination:
    """An SQS on-failure destination granting the function's role ``sqs:SendMessage`` only:
    that is all Lambda needs to deliver a failed event (CDK's SqsDestination also grants
    GetQueueAttributes and GetQueueUrl, which nothing calls)."""

    def __init__(self, queue: sqs.IQueue) -> None:
        self.queue = queue

    def bind(self, _scope: Construct, fn: lambda_.IFunction, *_args: Any, **_kwargs: Any) -> Any:
        # jsii passes the DestinationOptions struct; the destination type is always failure.
        fn.add_to_role_policy(
            iam.PolicyStatement(actions=["sqs:SendMessage"], resources=[self.queue.queue_arn])
        )
        return lambda_.DestinationConfig(destination=self.queue.queue_arn)


def _acknowledge_tracing_grant(function: lambda_.Function) -> None:
    """The one wildcard resource in a function's role: X-Ray's, which takes no other."""
    role = function.role
    if role is None:
        raise ValueError(f"{function.node.path} has no execution role")
    acknowledge_nag(
        role.node.find_child("DefaultPolicy"),
        "AwsSolutions-IAM5[Resource::*]",
        "Active tracing: xray:PutTraceSegments and xray:PutTelemetryRecords, which CDK adds "
        "for Tracing.ACTIVE, support no resource-level permissions; '*' is the only resource "
        "IAM accepts for them (no other action of the role has a wildcard resource).",
    )


def _skip_function_checks(function: lambda_.Function, *, reserved: bool) -> None:
    skip_checkov(
        function,
        "CKV_AWS_116",
        "Failed asynchronous invocations go to an on-failure destination (the failure queue, "
        "AWS::Lambda::EventInvokeConfig), which records the error too; a DeadLetterConfig as "
        "well would deliver every failure twice.",
    )
    skip_checkov(
        function,
        "CKV_AWS_117",
        "Reaches only S3, DynamoDB and Lambda through their public endpoints over TLS; a VPC "
        "would need NAT or interface endpoints, which cost money while the stack is idle.",
    )
    skip_checkov(
        function,
        "CKV_AWS_173",
        "The environment holds bucket/table names and federation settings, no secrets; Lambda "
        "encrypts it at rest with its AWS-managed key.",
    )
    if not reserved:
        skip_checkov(
            function,
            "CKV_AWS_115",
            "Reserved concurrency is configurable (cdk.json sfl_infra.*_reserved_concurrency) "
            "but off by default: new accounts have 10 concurrent executions in all, and "
            "reserving any of them fails the deployment there.",
        )


# CloudWatch Logs retention periods by days (the same set infra.config allows).
_RETENTION = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    2192: logs.RetentionDays.SIX_YEARS,
    2557: logs.RetentionDays.SEVEN_YEARS,
    2922: logs.RetentionDays.EIGHT_YEARS,
    3288: logs.RetentionDays.NINE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}


def log_retention(days: int) -> logs.RetentionDays:
    try:
        return _RETENTION[days]
    except KeyError:
        raise ValueError(f"CloudWatch Logs has no retention of {days} days") from None
