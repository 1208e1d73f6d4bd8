"""The federation stack: composes storage, state, rounds and edge; wires and grants; outputs.

Every grant is written out here, action by action, on the narrowest resource that works, so
a reviewer reads each role's whole access in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aws_cdk import App, CfnOutput, CfnResource, Duration, Fn, Stack, Tags, Validations
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_notifications as s3n
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from infra.cleanup import DestroyCleanup, give_handlers_log_groups
from infra.compliance import acknowledge_nag, cfn_resource, ignore_cfn_lint, skip_checkov
from infra.config import LAMBDA_PYTHON_VERSION, StackConfig
from infra.dashboard import FederationDashboard
from infra.edge import THING_NAME_VARIABLE, FederationEdge
from infra.rounds import FederationRounds, FunctionSettings, log_retention
from infra.state import FederationState
from infra.storage import FederationStorage
from sfl.build import app_code, artifact
from sfl.core import layout
from sfl.core.notices import NOTICE_TOPIC_ENV, notice_topic
from sfl.core.resources import ACTIVE_INDEX, UPDATES_BUCKET, ResourceNames
from sfl.server.runtime import INITIATOR_SERVICE, METRICS_NAMESPACE, OPEN_ROUND_AGE_METRIC
from sfl.state.buffers.store import MEMBERS_INFIX, POOL_SUFFIX, TRAINING_SUFFIX
from sfl.state.control import CONTROL_SUFFIX
from sfl.state.registry import DEVICE_ATTRIBUTES

# TransactWriteItems is authorised per item, through each item's own action.
# What a device may do to its own registry item, and the attributes it may touch there
# (the key and its heartbeat); everything else in the item is the server's.
DEVICE_REGISTRY_ACTIONS = ("dynamodb:UpdateItem",)

# The singleton that aws_s3.Bucket.add_event_notification adds to the stack.
_S3_NOTIFICATIONS_HANDLER = "BucketNotificationsHandler050a0587b7544547bf325f094a3db834"

_CDK_HANDLER_CHECKOV_SKIPS = {
    "CKV_AWS_115": "CDK-provided custom-resource handler, invoked by CloudFormation only "
    "while deploying or destroying; no concurrency to limit.",
    "CKV_AWS_116": "CDK-provided custom-resource handler, invoked synchronously by "
    "CloudFormation, which reports any failure; there is no asynchronous event to keep.",
    "CKV_AWS_117": "CDK-provided custom-resource handler that calls only AWS public APIs "
    "(S3, Lambda) during deploy; a VPC would add NAT or endpoint costs.",
}

GREENGRASS_INSTALLER = (
    "sudo -E java -Droot=/greengrass/v2 -Dlog.store=FILE "
    "-jar ./GreengrassInstaller/lib/Greengrass.jar"
)


class FederationStack(Stack):
    """Everything ``cdk deploy`` creates and ``cdk destroy`` removes.

    Attributes: ``storage``, ``state``, ``rounds``, ``edge``, ``cleanup``,
    ``handler_log_groups``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: StackConfig,
        source_root: Path,
        app_root: Path | None = None,
        stack_name: str | None = None,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            stack_name=stack_name,
            description="Serverless federated learning: Lambda rounds, Greengrass edge clients.",
        )
        infra = config.infra
        # The user's code that the configuration names, and what each place carries of it.
        self.app_code = app_code.plan(config.federation, app_root=app_root, source_root=source_root)
        Tags.of(self).add("project", "serverless-federated-learning")

        self.storage = FederationStorage(
            self,
            "Storage",
            update_expiry_days=infra.update_expiry_days,
            max_update_bytes=config.federation.max_update_bytes,
            log_retention_days=infra.log_retention_days,
            retain_data=infra.retain_data,
        )
        self.state = FederationState(self, "State", retain_data=infra.retain_data)
        self.resource_names = ResourceNames(
            models_bucket=self.storage.models_bucket.bucket_name,
            updates_bucket=self.storage.updates_bucket.bucket_name,
            clients_table=self.state.clients_table.table_name,
            rounds_table=self.state.rounds_table.table_name,
        )
        # One source: this feeds the Lambdas' environment, and the same config and names the
        # devices' component configuration (sfl.build.recipes).
        environment = {**self.resource_names.to_env(), **config.federation.to_env()}

        self.rounds = FederationRounds(
            self,
            "Rounds",
            source_root=source_root,
            app=self.app_code,
            python_version=LAMBDA_PYTHON_VERSION,
            environment=environment,
            initiator=FunctionSettings(
                memory_mb=infra.initiator_memory_mb,
                timeout_seconds=infra.initiator_timeout_seconds,
                reserved_concurrency=infra.initiator_reserved_concurrency,
            ),
            # Memory, /tmp and timeout sized for the model and the rule (sfl.core.sizing).
            averager=FunctionSettings(
                memory_mb=config.averager.memory_mb,
                timeout_seconds=config.averager.timeout_seconds,
                reserved_concurrency=infra.averager_reserved_concurrency,
                ephemeral_mib=config.averager.ephemeral_mib,
            ),
            schedule_minutes=infra.schedule_minutes,
            schedule_enabled=infra.schedule_enabled,
            log_retention_days=infra.log_retention_days,
            # Sharded aggregation (sfl.server.shards) is deployed only when configured: its function
            # and grants exist only then. Same memory and timeout as the averager.
            shard=FunctionSettings(
                memory_mb=config.averager.memory_mb,
                timeout_seconds=config.averager.timeout_seconds,
                reserved_concurrency=0,
                ephemeral_mib=config.averager.ephemeral_mib,
            )
            if config.federation.aggregation_shard_above > 0
            else None,
        )
        # Round notices (push): one topic per stack and experiment; the initiator publishes
        # there, devices subscribe (sfl.core.notices). Buffered mode publishes no notice for
        # a pick yet, so its devices poll at their own period: no topic, no grant.
        self.notice_topic = (
            ""
            if config.federation.mode == "buffered"
            else notice_topic(self.stack_name, config.federation.experiment)
        )
        if self.notice_topic:
            self.rounds.initiator.add_environment(NOTICE_TOPIC_ENV, self.notice_topic)
        self.edge = FederationEdge(
            self,
            "Edge",
            notice_topic=self.notice_topic,
            component_name=infra.resolved_component_name,
            federation=config.federation,
            resource_names=self.resource_names,
            source_root=source_root,
            app=self.app_code,
            device_configuration=infra.device_configuration,
        )

        self._buffered = config.federation.mode == "buffered"
        self._grant_initiator()
        self._grant_averager()
        self._grant_devices()
        self._wire_update_notifications()
        self._acknowledge_findings()
        self._alarms(
            config.federation.round_deadline_seconds, infra.schedule_minutes, infra.alarm_email
        )
        self.dashboard = FederationDashboard(
            self,
            "Monitoring",
            initiator=self.rounds.initiator,
            averager=self.rounds.averager,
            region=self.region,
        )
        # What cdk destroy needs (infra.cleanup): free the IoT policy and the device role first,
        # and a log group that goes with the stack for each of CDK's own handler functions.
        retention = log_retention(infra.log_retention_days)
        self.cleanup = DestroyCleanup(
            self,
            "DestroyCleanup",
            iot_policy=self.edge.device_iot_policy,
            device_role=self.edge.device_role,
            owned_role_policies=[self.edge.nucleus_policy],
            retention=retention,
            source_root=source_root,
        )
        self.handler_log_groups = give_handlers_log_groups(self.cleanup, retention)
        self._outputs()

    # --- grants ------------------------------------------------------------------------------

    def _alarms(self, hard_deadline_seconds: int, schedule_minutes: int, email: str) -> None:
        """Alarms on Lambda errors, failed async events waiting in the DLQ, and a round still
        open well past its hard deadline (the watchdog tick should have abandoned it); each
        notifies ``self.alarm_topic`` when it fires and when it clears. ``self.alarms`` has
        their metrics, ``self.alarm_resources`` the alarms."""
        period = Duration.minutes(5)
        self.alarms = {
            "InitiatorErrors": self.rounds.initiator.metric_errors(period=period),
            "AveragerErrors": self.rounds.averager.metric_errors(period=period),
            # Messages sent, not the queue's depth: one failure would keep a depth alarm in
            # ALARM for the queue's whole 14-day retention.
            "FailedEvents": self.rounds.failure_queue.metric_number_of_messages_sent(
                period=period, statistic="Sum"
            ),
            # Invocations Lambda refused for want of concurrency (docs/deploy.md#concurrency).
            **self.rounds.throttle_metrics(period),
        }
        created = {
            name: cloudwatch.Alarm(
                self,
                f"{name}Alarm",
                metric=metric,
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description=f"sfl: {name} >= 1 in 5 minutes",
            )
            for name, metric in self.alarms.items()
        }
        overdue = hard_deadline_seconds + 2 * 60 * schedule_minutes
        created["OverdueRound"] = cloudwatch.Alarm(
            self,
            "OverdueRoundAlarm",
            metric=cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name=OPEN_ROUND_AGE_METRIC,
                dimensions_map={"service": INITIATOR_SERVICE},
                statistic="Maximum",
                period=period,
            ),
            threshold=overdue,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=(
                f"sfl: a round has been open for over {overdue} s (hard deadline plus two "
                "schedule periods); the averager's watchdog tick is not running"
            ),
        )
        self.alarm_resources = created

        self.alarm_topic = sns.Topic(
            self, "AlarmTopic", display_name="sfl alarms", enforce_ssl=True
        )
        reason = (
            "Alarm notifications carry only alarm names, states and thresholds. CloudWatch "
            "cannot publish to a topic encrypted with the AWS managed SNS key, and a "
            "customer-managed key would cost more than the rest of the idle stack."
        )
        acknowledge_nag(self.alarm_topic, "AwsSolutions-SNS2", reason)
        skip_checkov(self.alarm_topic, "CKV_AWS_26", reason)
        if email:
            self.alarm_topic.add_subscription(subscriptions.EmailSubscription(email))
        action = cloudwatch_actions.SnsAction(self.alarm_topic)
        for alarm in created.values():
            alarm.add_alarm_action(action)
            alarm.add_ok_action(action)
        # The topic policy that enforce_ssl adds replaces SNS's default one, which is what lets
        # alarms of this account publish: allow CloudWatch, for these alarms only.
        self.alarm_topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AlarmsPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["sns:Publish"],
                resources=[self.alarm_topic.topic_arn],
                conditions={
                    "StringEquals": {"aws:SourceAccount": self.account},
                    "ArnEquals": {"aws:SourceArn": [a.alarm_arn for a in created.values()]},
                },
            )
        )

    def _grant_initiator(self) -> None:
        """Reads the registry (never writes it), creates rounds, publishes the assignment."""
        role = _present(self.rounds.initiator.role)
        models = self.storage.models_bucket
        # HeadObject of the round's base model.
        _allow(role, ["s3:GetObject"], [models.arn_for_objects(f"{layout.MODELS_PREFIX}*")])
        # ListBucket only makes a missing model answer 404 instead of 403 (the first tick
        # may come before the deploy-time bootstrap wrote version 0).
        _allow(role, ["s3:ListBucket"], [models.bucket_arn])
        # The assignment is read back (is it this round's?) before an open round's is
        # re-published.
        _allow(
            role,
            ["s3:GetObject", "s3:PutObject"],
            [models.arn_for_objects(layout.ASSIGNMENT_KEY)],
        )
        if not self._buffered:
            # A rollback (sfl models rollback): the chosen version written again as the next
            # version, and that version's lineage record beside it; each key written once.
            # (Buffered mode refuses a rollback.)
            _allow(
                role,
                ["s3:PutObject"],
                [models.arn_for_objects(f"{layout.MODELS_PREFIX}*")],
                conditions={"StringEquals": {"s3:if-none-match": "*"}},
            )
        # Round notices (sfl.server.notices): the account's IoT data endpoint, looked up once
        # per container, then one publish per round on this stack's notice topic alone.
        if self.notice_topic:
            _allow(role, ["iot:DescribeEndpoint"], ["*"])
            _allow(role, ["iot:Publish"], [self.edge.notice_topic_arn])
        acknowledge_nag(
            role.node.find_child("DefaultPolicy"),
            "AwsSolutions-IAM5[Resource::*]",
            "Two actions that support no resource-level permissions, so '*' is the only "
            "resource IAM accepts: iot:DescribeEndpoint (the account's IoT data endpoint, read "
            "once per container to publish round notices) and active tracing's "
            "xray:PutTraceSegments and xray:PutTelemetryRecords. No other action of the role "
            "has a wildcard resource.",
        )
        # Selection reads active clients from the registry's active index, one Query per
        # shard; never a Scan of the whole registry.
        _allow(
            role,
            ["dynamodb:Query"],
            [f"{self.state.clients_table.table_arn}/index/{ACTIVE_INDEX.name}"],
        )
        # The newest round is a Query; each round is a TransactWriteItems (Put of round n+1,
        # ConditionCheck of round n, UpdateItem of the item naming the newest round, which the
        # operator's reads start from). Its selected clients' slots are a
        # BatchWriteItem, then an UpdateItem marks them ready (or abandons a round whose
        # initiator died before that); an open round's assignment is re-published from a
        # Query of its slots. Buffered mode reads the newest round (where its pool starts)
        # and writes tickets (below): no round, no slots.
        round_only = {"dynamodb:ConditionCheckItem", "dynamodb:BatchWriteItem"}
        _allow(
            role,
            [
                action
                for action in (
                    "dynamodb:Query",
                    "dynamodb:PutItem",
                    "dynamodb:ConditionCheckItem",
                    "dynamodb:BatchWriteItem",
                    "dynamodb:UpdateItem",
                )
                if not (self._buffered and action in round_only)
            ],
            [self.state.rounds_table.table_arn],
        )
        # The operator's control record (sfl.state.control: pause, runtime config, rollback), read
        # on every run; a carried-out rollback is cleared (UpdateItem, granted above).
        _allow(
            role,
            ["dynamodb:GetItem"],
            [self.state.rounds_table.table_arn],
            conditions={
                "ForAllValues:StringLike": {"dynamodb:LeadingKeys": [f"*{CONTROL_SUFFIX}"]}
            },
        )

        if self._buffered:
            # Buffered mode (docs/buffered.md): the ticket pool is read on every run; tickets
            # are issued by a TransactWriteItems of UpdateItem (the pool) and PutItem (each
            # ticket and its place), granted above.
            _allow(
                role,
                ["dynamodb:GetItem"],
                [self.state.rounds_table.table_arn],
                conditions={
                    "ForAllValues:StringLike": {"dynamodb:LeadingKeys": [f"*{POOL_SUFFIX}"]}
                },
            )

    def _grant_averager(self) -> None:
        """Judges updates, writes each model version once, records rounds and turnarounds."""
        role = _present(self.rounds.averager.role)
        models = self.storage.models_bucket
        updates = self.storage.updates_bucket
        _allow(role, ["s3:GetObject"], [updates.arn_for_objects(f"{layout.UPDATES_PREFIX}*")])
        # ... and S3 returns them only to a caller the updates key lets decrypt.
        self._allow_key(role, "AveragerDecrypts", ["kms:Decrypt"])
        # A refused upload that is no answer (not selected, late, repeated) is deleted, only
        # while it is the object refused: S3 refuses a delete without If-Match (its ETag).
        # So is every update of a round or buffer once its version is written and the round
        # or buffer closed (sfl.server.update_disposal: DeleteObjects, each with its ETag).
        _allow(
            role,
            ["s3:DeleteObject"],
            [updates.arn_for_objects(f"{layout.UPDATES_PREFIX}*")],
            conditions={"Null": {"s3:if-match": "false"}},
        )
        # Looking for an upload whose S3 event never arrived (the tick's recovery).
        _allow(role, ["s3:ListBucket"], [updates.bucket_arn])
        # Model versions, and the server state a stateful rule keeps beside them.
        versions = [
            models.arn_for_objects(f"{layout.MODELS_PREFIX}*"),
            models.arn_for_objects(f"{layout.STATE_PREFIX}*"),
        ]
        _allow(role, ["s3:GetObject"], versions)
        # The state of a version made without one is absent: 404 (not 403) needs ListBucket.
        _allow(role, ["s3:ListBucket"], [models.bucket_arn])
        # New objects only, each written once: S3 refuses the write if the key exists.
        # (A single-part PutObject: multipart uploads' parts carry no If-None-Match.)
        _allow(
            role,
            ["s3:PutObject"],
            versions,
            conditions={"StringEquals": {"s3:if-none-match": "*"}},
        )
        _allow(
            role,
            ["dynamodb:GetItem", "dynamodb:Query", "dynamodb:UpdateItem"],
            [self.state.rounds_table.table_arn],
        )
        if self._buffered:
            # Buffered mode: an answer's transaction deletes the ticket's place and puts the
            # accepted update's member item; a step's begin checks the pool's version.
            table = self.state.rounds_table.table_arn
            for action, leading in (
                ("dynamodb:DeleteItem", f"*{TRAINING_SUFFIX}"),
                ("dynamodb:PutItem", f"*{MEMBERS_INFIX}*"),
                ("dynamodb:ConditionCheckItem", f"*{POOL_SUFFIX}"),
            ):
                _allow(
                    role,
                    [action],
                    [table],
                    conditions={"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [leading]}},
                )
        # The server's own measurements of each client (turnaround, answers): read, update.
        _allow(
            role,
            ["dynamodb:GetItem", "dynamodb:UpdateItem"],
            [self.state.clients_table.table_arn],
        )
        # The held-out evaluation set each new model is scored on, if the operator uploaded
        # one (sfl eval-data upload).
        _allow(role, ["s3:GetObject"], [models.arn_for_objects(layout.EVAL_DATA_KEY)])
        # Chains the next round after closing one; the version-less ARN only.
        _allow(role, ["lambda:InvokeFunction"], [self.rounds.initiator.function_arn])
        shard = self.rounds.shard
        if shard is not None:
            # A large round: invokes the shard function, then reads the partial sums.
            _allow(role, ["lambda:InvokeFunction"], [shard.function_arn])
            _allow(role, ["s3:GetObject"], [models.arn_for_objects(f"{layout.PARTIALS_PREFIX}*")])
            self._grant_shard(shard)

    def _grant_shard(self, shard: lambda_.IFunction) -> None:
        """Reads one shard's updates and the base model, writes its partial sum once."""
        role = _present(shard.role)
        models = self.storage.models_bucket
        updates = self.storage.updates_bucket
        partials = models.arn_for_objects(f"{layout.PARTIALS_PREFIX}*")
        _allow(role, ["s3:GetObject"], [updates.arn_for_objects(f"{layout.UPDATES_PREFIX}*")])
        self._allow_key(role, "ShardDecrypts", ["kms:Decrypt"])
        _allow(
            role,
            ["s3:GetObject"],
            [models.arn_for_objects(f"{layout.MODELS_PREFIX}*"), partials],
        )
        # A partial sum not yet written is a 404 (not 403) only with ListBucket.
        _allow(role, ["s3:ListBucket"], [models.bucket_arn])
        _allow(
            role,
            ["s3:PutObject"],
            [partials],
            conditions={"StringEquals": {"s3:if-none-match": "*"}},
        )

    def _grant_devices(self) -> None:
        role = self.edge.device_role
        models = self.storage.models_bucket
        # What the edge client reads and nothing more: the assignment, the model versions it
        # names, and the promoted one for inference. Not a version's lineage record (every
        # round's participants and scores) nor anything else in the bucket, and no listing:
        # before the first round S3 answers its poll 403, which it takes for "no round yet".
        _allow(
            role,
            ["s3:GetObject"],
            [
                models.arn_for_objects(layout.model_key_pattern()),
                models.arn_for_objects(layout.PROMOTED_MODEL_KEY),
                models.arn_for_objects(layout.ASSIGNMENT_KEY),
            ],
        )
        # Its own round keys only, stored so the averager alone can read them: no archive
        # storage class (GetObject would fail), no customer-provided key (nobody else could
        # read it), and no encryption other than the bucket's own key (SSE-S3 or another KMS
        # key would let whoever may read the bucket read the update).
        key = self.storage.updates_key
        _allow(
            role,
            ["s3:PutObject"],
            [
                self.storage.updates_bucket.arn_for_objects(
                    layout.update_key_pattern(THING_NAME_VARIABLE)
                )
            ],
            conditions={
                "StringEqualsIfExists": {
                    "s3:x-amz-storage-class": "STANDARD",
                    "s3:x-amz-server-side-encryption": "aws:kms",
                    "s3:x-amz-server-side-encryption-aws-kms-key-id": key.key_arn,
                },
                "Null": {"s3:x-amz-server-side-encryption-customer-algorithm": "true"},
            },
        )
        # Encrypting with the updates key, for S3's PutObject; never decrypting. (The edge
        # client uploads with one PutObject: a multipart upload would need kms:Decrypt too.)
        self._allow_key(role, "DevicesEncrypt", ["kms:GenerateDataKey"])
        # Its own registry item only, and only the attributes a device may write: what
        # decides selection and liveness beyond these is the server's to measure.
        _allow(
            role,
            list(DEVICE_REGISTRY_ACTIONS),
            [self.state.clients_table.table_arn],
            conditions={
                "ForAllValues:StringEquals": {
                    "dynamodb:LeadingKeys": [THING_NAME_VARIABLE],
                    "dynamodb:Attributes": list(DEVICE_ATTRIBUTES),
                },
                # No reading back more than those attributes (a whole item, an index).
                "StringEqualsIfExists": {
                    "dynamodb:Select": "SPECIFIC_ATTRIBUTES",
                    "dynamodb:ReturnValues": ["NONE", "UPDATED_OLD", "UPDATED_NEW"],
                },
            },
        )

    def _allow_key(self, role: iam.IRole, sid: str, actions: Sequence[str]) -> None:
        """Let ``role`` use the updates key for ``actions``, only through S3 (the one bucket
        encrypted with it), in the key's own policy: only these statements allow any use of
        the key (the account's statement allows none, so no IAM policy can grant one). (No
        condition on the encryption context, the bucket's ARN with an S3 Bucket Key: the
        bucket names the key, so the key naming the bucket would be a cycle.)"""
        self.storage.updates_key.add_to_resource_policy(
            iam.PolicyStatement(
                sid=sid,
                principals=[role],
                actions=list(actions),
                resources=["*"],  # in a key policy: this key
                conditions={"StringEquals": {"kms:ViaService": f"s3.{self.region}.amazonaws.com"}},
            )
        )

    def _wire_update_notifications(self) -> None:
        self.storage.updates_bucket.add_event_notification(
            s3.EventType.OBJECT_CREATED,
            s3n.LambdaDestination(self.rounds.averager),
            s3.NotificationKeyFilter(
                prefix=UPDATES_BUCKET.notify_prefix, suffix=UPDATES_BUCKET.notify_suffix
            ),
        )

    # --- findings ----------------------------------------------------------------------------

    def _acknowledge_findings(self) -> None:
        """Acknowledge, one by one, the findings that least privilege cannot remove."""
        models = self.storage.models_bucket
        updates = self.storage.updates_bucket
        models_global = (models, f"{layout.MODELS_PREFIX}*")
        server_state = (models, f"{layout.STATE_PREFIX}*")
        all_updates = (updates, f"{layout.UPDATES_PREFIX}*")
        own_updates = (updates, layout.update_key_pattern(THING_NAME_VARIABLE))
        object_wildcards = {
            self.rounds.initiator.role: [
                (
                    models_global,
                    "reads whichever global model version the new round starts from, and "
                    "writes a rollback's copy of one as the next version",
                ),
            ],
            self.rounds.averager.role: [
                (models_global, "reads the round's base model and writes the next version"),
                (server_state, "reads the base version's server state and writes the next one"),
                (all_updates, "reads the update of any client selected for the round"),
            ],
            self.edge.device_role: [
                (
                    (models, layout.model_key_pattern()),
                    "downloads whichever global model version it is assigned",
                ),
                (own_updates, "uploads only under its own thing name, one key per round"),
            ],
        }
        shard = self.rounds.shard
        if shard is not None:
            partials = (models, f"{layout.PARTIALS_PREFIX}*")
            object_wildcards[self.rounds.averager.role].append(
                (partials, "reads the partial sums of a sharded round's shards")
            )
            object_wildcards[shard.role] = [
                (models_global, "reads the round's base model"),
                (all_updates, "reads the update of any client in its shard"),
                (partials, "writes its shard's partial sum once, named by round and shard"),
            ]
        for role, findings in object_wildcards.items():
            for (bucket, pattern), why in findings:
                acknowledge_nag(
                    _present(role).node.find_child("DefaultPolicy"),
                    f"AwsSolutions-IAM5[Resource::<{self._logical_id(bucket)}.Arn>/"
                    f"{pattern.replace('${', '<').replace('}', '>')}]",
                    f"Object keys under one prefix of the layout (sfl.core.layout): "
                    f"the role {why}; "
                    "the key names a version, client or round, so no fixed list exists.",
                )

        # CDK's own handler for S3 notifications (a deploy-time custom resource).
        handler_role = self.node.find_child(_S3_NOTIFICATIONS_HANDLER).node.find_child("Role")
        acknowledge_nag(
            cfn_resource(handler_role),
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AWSLambdaBasicExecutionRole]",
            "CDK's bucket-notifications handler, run only at deploy time; the managed policy "
            "lets it write its own CloudWatch logs and nothing else.",
        )

        ours = {f.node.path for f in (self.rounds.initiator, self.rounds.averager)}
        for node in self.node.find_all():
            if not (
                isinstance(node, CfnResource) and node.cfn_resource_type == "AWS::Lambda::Function"
            ):
                continue
            # CDK renders a DependsOn on the execution role next to the GetAtt of its ARN:
            # redundant (W3005), and it is how CDK orders the role's policy before the function.
            ignore_cfn_lint(node, "W3005")
            scope = node.node.scope
            if scope is not None and scope.node.path not in ours:
                # CDK's deploy-time handlers: S3 auto-delete, S3 notifications, AwsCustomResource.
                for check_id, reason in _CDK_HANDLER_CHECKOV_SKIPS.items():
                    skip_checkov(node, check_id, reason)

    def _logical_id(self, construct: Construct) -> str:
        return str(self.resolve(self.get_logical_id(cfn_resource(construct))))

    # --- outputs -----------------------------------------------------------------------------

    def _outputs(self) -> None:
        names = self.resource_names
        edge = self.edge
        values = {
            "ModelsBucketName": (names.models_bucket, "global models and the round assignment"),
            "UpdatesBucketName": (names.updates_bucket, "client updates"),
            "ClientsTableName": (names.clients_table, "client registry"),
            "RoundsTableName": (names.rounds_table, "round records"),
            "InitiatorFunctionName": (self.rounds.initiator.function_name, "starts rounds"),
            "AveragerFunctionName": (self.rounds.averager.function_name, "aggregates rounds"),
            "InitiatorLogGroupName": (
                self.rounds.initiator_log_group.log_group_name,
                "the initiator's logs",
            ),
            "AveragerLogGroupName": (
                self.rounds.averager_log_group.log_group_name,
                "the averager's logs",
            ),
            "FailedInvocationsQueueUrl": (
                self.rounds.failure_queue.queue_url,
                "failed asynchronous invocations of either function",
            ),
            "AlarmNames": (
                Fn.join(",", [a.alarm_name for a in self.alarm_resources.values()]),
                "the stack's alarms, comma-separated (sfl status shows their state)",
            ),
            "DashboardUrl": (self.dashboard.url, "the federation's CloudWatch dashboard"),
            "AlarmTopicArn": (
                self.alarm_topic.topic_arn,
                "alarms notify this topic; subscribe to it (or set sfl_infra.alarm_email)",
            ),
            "TokenExchangeRoleName": (edge.device_role.role_name, "devices' credentials role"),
            "TokenExchangeRoleAliasName": (edge.role_alias_name, "IoT role alias of that role"),
            "NucleusPolicyName": (
                edge.nucleus_policy.managed_policy_name,
                "IAM policy '<role>Access' the installer reuses (artifact download)",
            ),
            "DeviceIotPolicyName": (
                edge.device_iot_policy_name,
                "IoT policy for core device certificates (MQTT, Greengrass, the role alias)",
            ),
            "ThingGroupName": (edge.thing_group_name, "the stack deploys the component to it"),
            "ComponentName": (edge.component_name, "Greengrass component of the edge client"),
            "ComponentVersion": (edge.component_version, "its version in this deployment"),
            "DeploymentId": (edge.deployment.attr_deployment_id, "the thing group's deployment"),
            "DeviceSetupCommand": (
                f"{GREENGRASS_INSTALLER} --aws-region {self.region} "
                "--thing-name <THING_NAME> "
                f"--thing-group-name {edge.thing_group_name} "
                f"--thing-policy-name {edge.device_iot_policy_name} "
                f"--tes-role-name {edge.device_role.role_name} "
                f"--tes-role-alias-name {edge.role_alias_name} "
                "--component-default-user ggc_user:ggc_group "
                "--provision true --setup-system-service true",
                "run on a device with the Greengrass installer unpacked; <THING_NAME> (no ':') "
                "becomes its client id",
            ),
        }
        for output_id, (value, description) in values.items():
            CfnOutput(self, output_id, value=value, description=description)


def build_app(
    app: App, *, app_root: Path | None = None, source_root: Path = artifact.SOURCE_ROOT
) -> FederationStack:
    """Configure the federation stack from the app's context and check it with cdk-nag.

    ``app_root``: the user's app folder (its ``cdk.json``, its packages); code the
    configuration names by import path ships from there. ``source_root``: the framework's
    checkout (its ``lambdas/``, ``requirements/`` and packages)."""
    config = StackConfig.from_context(app.node.try_get_context)
    stack = FederationStack(
        app,
        config.infra.stack_name,
        config=config,
        source_root=source_root,
        app_root=app_root if app_root is not None else source_root,
    )
    Validations.of(app).add_plugins(
        AwsSolutionsChecks(app, write_suppressions_to_cloud_formation=True)
    )
    return stack


def _present(role: iam.IRole | None) -> iam.IRole:
    if role is None:
        raise ValueError("function has no execution role")
    return role


def _allow(
    role: iam.IRole,
    actions: Sequence[str],
    resources: Sequence[str],
    *,
    conditions: dict[str, object] | None = None,
) -> None:
    role.add_to_principal_policy(
        iam.PolicyStatement(
            effect=iam.Effect.ALLOW,
            actions=list(actions),
            resources=list(resources),
            conditions=conditions,
        )
    )
