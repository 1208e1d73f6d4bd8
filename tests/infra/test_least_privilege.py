"""Least privilege, proven: each role is granted exactly what its code's calls need.

The stack is deployed into the local emulator and the real code paths run on it: the
initiator handler (before and after model version 0 exists, with and without an open
round), the averager handler (the deploy-time bootstrap, S3 events of good, broken and
unasked-for uploads, a watchdog tick that finds an upload whose event was lost, and one
past the round's deadlines), and edge clients (heartbeat, polling before any round,
answering rounds), and the destroy clean-up's handler at stack deletion (device
certificates and a thing group holding the IoT policy, a foreign policy on the device
role). The same proof runs for a stack synthesized with ``mode=buffered``, whose code
paths are its own: tickets issued and re-issued, a buffer of answers stepped into a version
(scored, its lineage written, the initiator chained), an answer found by the tick, junk,
tickets expired, a second step over the first's server state. Besides our code, the
platform acts with these roles too, and the test plays those calls as the platform makes
them: the Lambda service writes a function's logs and sends its failed asynchronous events
to the on-failure queue, Lambda's X-Ray daemon sends the segments the function's tracer
emitted (active tracing), and the Greengrass nucleus downloads the component's artifact
(GetBucketLocation, then GetObject, as its S3Downloader does).

Every call is recorded through botocore's events and turned into the IAM requests AWS makes
for it (``iam_proof.requests_for``: the operation -> action map is the only fixed list); the
role's policies, read back from IAM as CloudFormation created them, must allow every request
and hold no grant that no request needed. The KMS requests S3 makes as the caller for the
updates bucket's objects (a data key to store one, a decrypted one to return it) are KMS's to
authorise: the updates key's policy must allow each, and name no role for an action its calls
never needed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from iam_proof import (
    Account,
    CallRecorder,
    KeyPolicy,
    Policies,
    Request,
    requests_for,
    role_policies,
)
from local_stack import (
    Deployment,
    cleanup_handler,
    component_recipe,
    deploy,
    device_environment,
    local_aws_without_docker,
    s3_event,
    schedule_inputs,
)
from stack_template import Synthesized, cdk_context, synthesized_stack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning"),
]

CLIENTS = ["device-a", "device-b"]
THING_NAME = "credentials-iot:ThingName"


@dataclass
class Exercised:
    deployment: Deployment
    recorder: CallRecorder
    account: Account
    roles: dict[str, str]  # ROLES' key -> the role's name


#: The buffered stack's federation keys (cdk.json's, and these): a buffer of the two
#: devices' answers makes a version.
BUFFERED = {"mode": "buffered", "buffer_size": 2, "concurrency": 2}


@pytest.fixture(scope="module")
def buffered_synthesized(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    """The stack synthesized with ``mode=buffered`` (docs/buffered.md)."""
    context = cdk_context()
    context["sfl"] = {**context["sfl"], **BUFFERED}
    return synthesized_stack(tmp_path_factory.mktemp("buffered-cdk.out"), context)


@pytest.fixture(scope="module", params=["rounds", "buffered"])
def exercised(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Exercised]:
    """The stack of each mode deployed, its code paths run: every proof below holds for
    both (the default stack, and one synthesized with ``mode=buffered``)."""
    if request.param == "rounds":
        synthesized = request.getfixturevalue("synthesized")
        yield from exercise(synthesized, tmp_path_factory, run_code_paths, "Sfl-LeastPrivilege")
    else:
        synthesized = request.getfixturevalue("buffered_synthesized")
        yield from exercise(
            synthesized, tmp_path_factory, run_buffered_code_paths, "Sfl-LeastPrivilegeBuffered"
        )


def exercise(
    synthesized: Synthesized,
    tmp_path_factory: pytest.TempPathFactory,
    code_paths: Callable[[Harness], None],
    stack_name: str,
) -> Iterator[Exercised]:
    """Deploy the stack in the emulator and record what the code and the platform call."""
    from sfl.core.resources import CLIENTS_TABLE, ROUNDS_TABLE

    with local_aws_without_docker() as aws:
        deployment = deploy(aws, synthesized, stack_name=stack_name)
        outputs = deployment.outputs
        account = Account(
            partition="aws",
            region=aws.region,
            account_id=deployment.account,
            partition_keys={
                outputs["ClientsTableName"]: CLIENTS_TABLE.partition_key.name,
                outputs["RoundsTableName"]: ROUNDS_TABLE.partition_key.name,
            },
            bucket_keys={outputs["UpdatesBucketName"]: updates_key_arn(deployment)},
        )
        recorder = CallRecorder()
        with recorder.active():
            code_paths(Harness(deployment, recorder, tmp_path_factory.mktemp("devices")))
            play_platform_calls(deployment, recorder)
            cleanup_role = run_destroy_cleanup(deployment, recorder)
        roles = {
            "initiator": deployment.function_role_name("InitiatorFunctionName"),
            "averager": deployment.function_role_name("AveragerFunctionName"),
            "devices": outputs["TokenExchangeRoleName"],
            "cleanup": cleanup_role,
        }
        yield Exercised(deployment, recorder, account, roles)


class Harness:
    """The deployed functions invoked as Lambda invokes them (with the events the schedule
    and S3 send), and edge clients acting as the devices; every call recorded under the
    principal it is made for."""

    def __init__(self, deployment: Deployment, recorder: CallRecorder, data_dir: Path) -> None:
        from edge_client.client import EdgeClient
        from edge_client.settings import parse_settings
        from sfl.learning.splits import write_client_splits
        from sfl.learning.tasks import load_task
        from sfl.local.lambdas import LocalFunction

        self.deployment = deployment
        self.recorder = recorder
        self.aws = deployment.aws
        self.outputs = deployment.outputs
        self.s3 = self.aws.client("s3")
        endpoint = {
            **self.aws.env(),
            "POWERTOOLS_METRICS_DISABLED": "true",
            "POWERTOOLS_LOG_LEVEL": "WARNING",
            # A stateful rule's calls are a superset of FedAvg's: it also reads the base
            # version's server state (absent: 404) and writes the new version's, once.
            "SFL_AGGREGATION": "fedadam",
        }
        self.functions = {
            "initiator": (
                LocalFunction("initiator"),
                {**deployment.function_environment("InitiatorFunctionName"), **endpoint},
            ),
            "averager": (
                LocalFunction("averager"),
                {**deployment.function_environment("AveragerFunctionName"), **endpoint},
            ),
        }
        self.experiment = self.functions["averager"][1]["SFL_EXPERIMENT"]
        self.ticks = schedule_inputs(deployment)
        configuration = device_environment(deployment)
        self.task_name = configuration["SFL_TASK"]
        self.task = load_task(self.task_name)
        write_client_splits(self.task, data_dir, len(CLIENTS), "iid", seed=5, client_ids=CLIENTS)
        self.devices = {}
        for client_id in CLIENTS:
            settings = parse_settings(
                [],
                {
                    **configuration,
                    **self.aws.env(),
                    "AWS_IOT_THING_NAME": client_id,
                    "SFL_DATA_DIR": str(data_dir / client_id),
                },
            )
            with recorder.acting_as(f"device:{client_id}"):
                device = EdgeClient(settings, self.aws.clients(), self.task)
                device._data = self.task.load_client_data(settings.data_dir)
                device.heartbeat()
                assert device.poll() is None  # no round yet: the assignment is not there
            self.devices[client_id] = device

    def invoke(self, name: str, event: dict[str, Any]) -> Any:
        from sfl.local.emulator import lambda_environment

        function, env = self.functions[name]
        with self.recorder.acting_as(name), lambda_environment(env):
            return function.invoke(event)

    def tick(self, name: str) -> Any:
        output = "InitiatorFunctionName" if name == "initiator" else "AveragerFunctionName"
        return self.invoke(name, self.ticks[self.outputs[output]])

    def answer(self, client_id: str, expect_round: int | None = None) -> str:
        """The device polls, trains and uploads its answer; returns the update's key."""
        from sfl.core import layout

        with self.recorder.acting_as(f"device:{client_id}"):
            assignment = self.devices[client_id].poll()
            assert assignment is not None
            assert expect_round in (None, assignment.round)
            self.devices[client_id].answer(assignment)
        return layout.update_key(client_id, assignment.round)

    def deliver(self, key: str) -> Any:
        """S3's event for an uploaded object, to the averager."""
        head = self.s3.head_object(Bucket=self.outputs["UpdatesBucketName"], Key=key)
        event = s3_event(
            self.aws.region,
            self.outputs["UpdatesBucketName"],
            key,
            head["ContentLength"],
            head["ETag"],
        )
        return self.invoke("averager", event)

    def upload_eval_set(self) -> None:
        """The operator's held-out set (sfl eval-data upload): the averager scores each new
        model on it, and writes the version's lineage beside it."""
        from sfl.core import layout
        from sfl.server.evaluation import encode_eval_set

        self.s3.put_object(
            Bucket=self.outputs["ModelsBucketName"],
            Key=layout.EVAL_DATA_KEY,
            Body=encode_eval_set(self.task.load_central_data().test, task=self.task_name),
        )

    def promote_and_load(self, version: int) -> None:
        """The operator promotes a version (sfl models promote); an app on a device loads it."""
        from sfl.core import layout

        models = self.outputs["ModelsBucketName"]
        self.s3.copy_object(
            Bucket=models,
            Key=layout.PROMOTED_MODEL_KEY,
            CopySource={"Bucket": models, "Key": layout.model_key(version)},
        )
        with self.recorder.acting_as(f"device:{CLIENTS[0]}"):
            self.devices[CLIENTS[0]].models.s3.get_object(
                Bucket=models, Key=layout.PROMOTED_MODEL_KEY
            )

    def junk(self, number: int) -> None:
        """A broken upload from the second device, and one from a device nobody picked: both
        judged and refused (the device role could never write the second; the test can)."""
        from sfl.core import layout

        updates = self.outputs["UpdatesBucketName"]
        for client_id in (CLIENTS[1], "device-unpicked"):
            key = layout.update_key(client_id, number)
            put = self.s3.put_object(Bucket=updates, Key=key, Body=b"not a safetensors file")
            self.invoke("averager", s3_event(self.aws.region, updates, key, 22, put["ETag"]))

    def past_deadline(self, partition: str, number: int, *deadlines: str) -> None:
        """Time passes: the round's (or ticket's) deadlines are over."""
        self.aws.client("dynamodb").update_item(
            TableName=self.outputs["RoundsTableName"],
            Key={"experiment": {"S": partition}, "round": {"N": str(number)}},
            UpdateExpression="SET " + ", ".join(f"{d} = :past" for d in deadlines),
            ExpressionAttributeValues={":past": {"N": str(time.time() - 1)}},
        )


def run_code_paths(harness: Harness) -> None:
    """Rounds mode: two rounds, a lost event, junk, deadlines, a rollback."""
    tick, invoke = harness.tick, harness.invoke
    # The first tick can come before the deploy-time bootstrap wrote model version 0.
    assert tick("initiator")["started"] is False
    assert invoke("averager", {"sfl": "bootstrap"}) == {"bootstrap": "written"}
    assert tick("initiator")["round"] == 1
    assert tick("initiator")["started"] is False  # round 1 is open: republish only
    harness.upload_eval_set()
    for client_id in CLIENTS:
        harness.deliver(harness.answer(client_id, 1))
    assert tick("initiator")["round"] == 2
    harness.promote_and_load(1)
    # Round 2: one upload whose S3 event never arrives; the watchdog tick finds it.
    harness.answer(CLIENTS[0], 2)
    time.sleep(0.01)
    tick("averager")
    harness.junk(2)
    # Time passes: the round's deadlines are over, and the watchdog closes or abandons it.
    harness.past_deadline(harness.experiment, 2, "deadline_at", "soft_deadline_at")
    assert tick("averager")["status"] in {"CLOSED", "ABANDONED"}
    # The operator asks for a rollback (sfl models rollback 0): the initiator reads the control
    # record, writes version 0 again as the next version with its lineage, clears the request.
    from sfl.state.control import ControlStore

    control = ControlStore(harness.aws.client("dynamodb"), harness.outputs["RoundsTableName"])
    control.request_rollback(harness.experiment, 0, now=time.time())
    assert tick("initiator")["round"] == 3
    assert control.state(harness.experiment).rollback_to is None


def run_buffered_code_paths(harness: Harness) -> None:
    """Buffered mode: tickets, a buffer of two answers made a version (scored, its lineage
    written, the initiator chained), a lost event, junk, an expired ticket, a second step."""
    from sfl.state.buffers import BufferStore
    from sfl.state.buffers.store import TICKETS_SUFFIX, TRAINING_SUFFIX

    tick, invoke = harness.tick, harness.invoke
    buffers = BufferStore(harness.aws.client("dynamodb"), harness.outputs["RoundsTableName"])
    experiment = harness.experiment
    assert tick("initiator")["started"] is False  # no version 0 yet: no pool
    assert invoke("averager", {"sfl": "bootstrap"}) == {"bootstrap": "written"}
    assert tick("initiator")["started"] is True  # a ticket for each device
    assert tick("initiator")["started"] is False  # both places taken
    harness.upload_eval_set()
    for client_id in CLIENTS:
        harness.deliver(harness.answer(client_id))
    pool = buffers.pool(experiment)
    assert pool is not None and pool.version == 1
    assert tick("initiator")["started"] is True  # the freed places filled again
    harness.promote_and_load(1)
    # One answer whose S3 event never arrives; the watchdog tick finds it.
    harness.answer(CLIENTS[0])
    time.sleep(0.01)
    tick("averager")
    (other,) = buffers.training(experiment)
    harness.junk(other.number)
    # Tickets whose lease ended: the watchdog expires them and frees their places.
    assert tick("initiator")["started"] is True
    for ticket in buffers.training(experiment):  # the ticket, and its place
        for partition in (TICKETS_SUFFIX, TRAINING_SUFFIX):
            harness.past_deadline(experiment + partition, ticket.number, "deadline_at")
    tick("averager")
    assert buffers.training(experiment) == []
    # The second buffer fills (the device that missed its lease sits out): its step reads
    # version 1's server state.
    assert tick("initiator")["started"] is True
    harness.deliver(harness.answer(CLIENTS[0]))
    pool = buffers.pool(experiment)
    assert pool is not None and pool.version == 2, pool


def play_platform_calls(deployment: Deployment, recorder: CallRecorder) -> None:
    """What AWS services do with these roles besides our code."""
    aws = deployment.aws
    outputs = deployment.outputs
    logs = aws.client("logs")
    sqs = aws.client("sqs")
    xray = aws.client("xray")
    for name, log_group in (
        ("initiator", outputs["InitiatorLogGroupName"]),
        ("averager", outputs["AveragerLogGroupName"]),
    ):
        with recorder.acting_as(name):
            # The Lambda runtime writes the function's logs ...
            logs.create_log_stream(logGroupName=log_group, logStreamName="2026/11/29/[$LATEST]1")
            logs.put_log_events(
                logGroupName=log_group,
                logStreamName="2026/11/29/[$LATEST]1",
                logEvents=[{"timestamp": int(time.time() * 1000), "message": "START"}],
            )
            # ... and sends a failed asynchronous invocation to the on-failure destination.
            sqs.send_message(
                QueueUrl=outputs["FailedInvocationsQueueUrl"],
                MessageBody=json.dumps({"requestContext": {"condition": "RetriesExhausted"}}),
            )
            # Lambda's X-Ray daemon, with the function's credentials, forwards the segments
            # its tracer sent over UDP, and its own telemetry.
            xray.put_trace_segments(TraceSegmentDocuments=[_subsegment_document(name)])
            xray.put_telemetry_records(
                TelemetryRecords=[{"Timestamp": time.time(), "SegmentsSentCount": 1}]
            )
    # The nucleus, with a device's credentials, fetches the component's artifact.
    s3 = aws.client("s3")
    for manifest in component_recipe(deployment)["Manifests"]:
        for artifact in manifest["Artifacts"]:
            bucket, key = artifact["Uri"].removeprefix("s3://").split("/", 1)
            with recorder.acting_as(f"device:{CLIENTS[0]}"):
                s3.get_bucket_location(Bucket=bucket)
                s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def run_destroy_cleanup(deployment: Deployment, recorder: CallRecorder) -> str:
    """The destroy clean-up's handler with the ``Delete`` request CloudFormation sends it, in
    the account as devices leave it: certificates and a thing group holding the devices'
    IoT policy, and a managed policy someone attached to the device role. The Lambda service
    writes its logs. Returns the name of the function's role.

    moto's stack is never ``DELETE_IN_PROGRESS``: the handler reads the stack's status (the
    call is made, and recorded) and is then told the status a deletion has."""
    handler = cleanup_handler()
    aws = deployment.aws
    iot, iam = aws.client("iot"), aws.client("iam")
    ((logical, resource),) = [
        (lg, r) for lg, r in deployment.removed.items() if r["Type"] == "Custom::DestroyCleanup"
    ]
    properties = deployment.resolve(resource["Properties"])
    policy = properties["IotPolicyName"]
    for _ in CLIENTS:
        certificate = iot.create_keys_and_certificate(setAsActive=True)
        iot.attach_policy(policyName=policy, target=certificate["certificateArn"])
    group = iot.create_thing_group(thingGroupName=f"{deployment.stack_name}-Devices")
    iot.attach_policy(policyName=policy, target=group["thingGroupArn"])
    foreign = iam.create_policy(
        PolicyName=f"{deployment.stack_name}-LogManager",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "logs:PutLogEvents", "Resource": "*"}],
            }
        ),
    )["Policy"]["Arn"]
    iam.attach_role_policy(RoleName=properties["RoleName"], PolicyArn=foreign)

    cloudformation = aws.client("cloudformation")
    (stack,) = cloudformation.describe_stacks(StackName=deployment.stack_name)["Stacks"]
    read_status = handler.stack_status_reader(cloudformation)

    def being_deleted(stack_id: str) -> str:
        assert read_status(stack_id) == "CREATE_COMPLETE"  # moto's, as created
        return str(handler.STACK_BEING_DELETED)

    event = {
        "RequestType": "Delete",
        "StackId": stack["StackId"],
        "RequestId": "5d4f7c1e-0b1a-4d7e-9a51-2f3c4b5a6d7e",
        "LogicalResourceId": logical,
        "PhysicalResourceId": handler.PHYSICAL_ID,
        "ResourceType": resource["Type"],
        "ResourceProperties": properties,
    }
    with recorder.acting_as("cleanup"):
        outcome = handler.handle(event, iot=iot, iam=iam, stack_status=being_deleted)
    assert len(outcome.detached_targets) == len(CLIENTS) + 1
    assert outcome.detached_role_policies == [foreign]

    function = resource["Properties"]["ServiceToken"]["Fn::GetAtt"][0]
    function_properties = deployment.template["Resources"][function]["Properties"]
    log_group = deployment.resolve(function_properties["LoggingConfig"]["LogGroup"])
    logs = aws.client("logs")
    with recorder.acting_as("cleanup"):  # the Lambda runtime writes the function's logs
        logs.create_log_stream(logGroupName=log_group, logStreamName="2026/12/07/[$LATEST]1")
        logs.put_log_events(
            logGroupName=log_group,
            logStreamName="2026/12/07/[$LATEST]1",
            logEvents=[{"timestamp": int(time.time() * 1000), "message": "START"}],
        )
    return str(deployment.resolve(function_properties["Role"]).rsplit("/", 1)[-1])


def _subsegment_document(function: str) -> str:
    """One subsegment as the X-Ray SDK in a function emits it (``## lambda_handler``)."""
    now = time.time()
    return json.dumps(
        {
            "name": "## lambda_handler",
            "id": "53995c3f42cd8ad8",
            "trace_id": f"1-{int(now):08x}-{'0' * 24}",
            "parent_id": "7b7a2c8e1f0d3a44",
            "type": "subsegment",
            "start_time": now - 0.3,
            "end_time": now,
            "annotations": {"Service": f"sfl-{function}", "round": 1},
        }
    )


# --- the proof, role by role -----------------------------------------------------------------


def requests_of(
    exercised: Exercised, principals: list[str]
) -> list[tuple[Request, dict[str, str]]]:
    """Every IAM request the principals' calls needed, with the policy variables IAM would
    substitute for the caller (a device's thing name)."""
    found = []
    for principal in principals:
        variables = (
            {THING_NAME: principal.removeprefix("device:")}
            if principal.startswith("device:")
            else {}
        )
        for call in exercised.recorder.of(principal):
            if (call.service, call.operation) == ("sts", "GetCallerIdentity"):
                continue  # needs no permission
            requests = requests_for(call, exercised.account)
            if principal.startswith("device:") and _polled_before_any_round(call):
                # The edge client takes S3's 403 (no ListBucket) for "no round yet".
                requests = [r for r in requests if r.action != "s3:ListBucket"]
            found.extend((r, variables) for r in requests)
    assert found, f"no calls were recorded for {principals}"
    return found


def _polled_before_any_round(call: Any) -> bool:
    from sfl.core import layout

    return (
        (call.service, call.operation) == ("s3", "GetObject")
        and call.params.get("Key") == layout.ASSIGNMENT_KEY
        and call.status == 404
    )


#: Each role, and the principals whose calls it makes.
ROLES = {
    "initiator": ["initiator"],
    "averager": ["averager"],
    "devices": [f"device:{c}" for c in CLIENTS],
    "cleanup": ["cleanup"],  # the destroy clean-up's function
}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_call_the_code_makes_is_granted(exercised: Exercised, role: str):
    principals = ROLES[role]
    policies = policies_of(exercised, role)
    key = key_policy(exercised)
    arn = role_arn(exercised, role)

    def allowed(request: Request, variables: dict[str, str]) -> bool:
        if request.action.startswith("kms:"):  # the key policy decides (iam_proof.KeyPolicy)
            return key.allows(request, arn, identity=policies, variables=variables)
        return policies.allows(request, variables)

    denied = sorted(
        {
            f"{r.call}: {r.describe()}"
            for r, variables in requests_of(exercised, principals)
            if not allowed(r, variables)
        }
    )
    assert not denied, f"{role}: calls its policies do not allow:\n" + "\n".join(denied)


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_grant_is_used_by_some_call(exercised: Exercised, role: str):
    principals = ROLES[role]
    policies = policies_of(exercised, role)
    requests = requests_of(exercised, principals)
    unused = [g.describe() for g in policies.unused(requests)]
    unused += [
        f"key policy: {g.describe()}"
        for g in key_policy(exercised).unused(role_arn(exercised, role), [r for r, _ in requests])
    ]
    assert not unused, f"{role}: grants no call needed:\n" + "\n".join(unused)


def updates_key_arn(deployment: Deployment) -> str:
    """The KMS key the deployed updates bucket encrypts with by default."""
    s3 = deployment.aws.client("s3")
    encryption = s3.get_bucket_encryption(Bucket=deployment.outputs["UpdatesBucketName"])
    (rule,) = encryption["ServerSideEncryptionConfiguration"]["Rules"]
    return str(rule["ApplyServerSideEncryptionByDefault"]["KMSMasterKeyID"])


def key_policy(exercised: Exercised) -> KeyPolicy:
    """The updates key's policy as the template defines it, resolved against the stack."""
    deployment = exercised.deployment
    (logical,) = [lg for lg, kind in deployment.types.items() if kind == "AWS::KMS::Key"]
    document = deployment.template["Resources"][logical]["Properties"]["KeyPolicy"]
    return KeyPolicy(deployment.resolve(document))


def role_arn(exercised: Exercised, role: str) -> str:
    return f"arn:aws:iam::{exercised.account.account_id}:role/{exercised.roles[role]}"


def policies_of(exercised: Exercised, role: str) -> Policies:
    """The role's policies as the synthesized template defines them, resolved against the
    deployed stack (GetAtt as CloudFormation documents it; moto renders a log group's ARN
    without its ':*'). IAM holds the same actions: nothing else reaches the role."""
    name = exercised.roles[role]
    from_template = Policies(exercised.deployment.role_policy_documents(name))
    in_iam = role_policies(exercised.deployment.aws.client("iam"), name)
    assert sorted(g.action for g in in_iam.grants) == sorted(g.action for g in from_template.grants)
    return from_template


def test_model_versions_are_written_only_with_if_none_match(exercised: Exercised):
    """The averager's model writes carry If-None-Match, and its role refuses one without."""
    from sfl.core import layout

    policies = policies_of(exercised, "averager")
    models = exercised.deployment.outputs["ModelsBucketName"]
    writes = [
        r
        for r, _ in requests_of(exercised, ["averager"])
        if r.action == "s3:PutObject" and r.resource.startswith(f"arn:aws:s3:::{models}/")
    ]
    assert writes and all(r.context.get("s3:if-none-match") == ("*",) for r in writes)
    unconditional = Request("s3:PutObject", f"arn:aws:s3:::{models}/{layout.model_key(7)}")
    overwrite_assignment = Request(
        "s3:PutObject",
        f"arn:aws:s3:::{models}/{layout.ASSIGNMENT_KEY}",
        {"s3:if-none-match": ("*",)},
    )
    assert not policies.allows(unconditional, {})
    assert not policies.allows(overwrite_assignment, {})


def test_a_device_may_write_only_its_heartbeat_attributes_of_its_own_item(exercised: Exercised):
    """What the device role refuses: another device's item, the fields the server measures,
    reading a whole item back."""
    outputs = exercised.deployment.outputs
    policies = policies_of(exercised, "devices")
    table = (
        f"arn:aws:dynamodb:{exercised.account.region}:{exercised.account.account_id}:table/"
        f"{outputs['ClientsTableName']}"
    )
    me = {THING_NAME: "device-a"}

    def update(owner: str, *attributes: str, **extra: tuple[str, ...]) -> Request:
        context = {
            "dynamodb:LeadingKeys": (owner,),
            "dynamodb:Attributes": ("client_id", *attributes),
            **extra,
        }
        return Request("dynamodb:UpdateItem", table, context)

    assert policies.allows(update("device-a", "last_seen", "active_shard"), me)
    assert not policies.allows(update("device-b", "last_seen"), me)
    # Neither its item's expiry (TTL would delete the server's history of it) nor the
    # server's figures, nor registered_at (once any type and size).
    for measured in (
        "expires_at",
        "registered_at",
        "ewma_turnaround",
        "rounds_answered",
        "missed_streak",
        "miss_history",
        "num_examples",
    ):
        assert not policies.allows(update("device-a", "last_seen", measured), me)
    assert not policies.allows(
        update("device-a", "last_seen", **{"dynamodb:ReturnValues": ("ALL_NEW",)}), me
    )
    whole_item = Request(
        "dynamodb:GetItem",
        table,
        {
            "dynamodb:LeadingKeys": ("device-a",),
            "dynamodb:Attributes": ("client_id",),
            "dynamodb:Select": ("ALL_ATTRIBUTES",),
        },
    )
    assert not policies.allows(whole_item, me)


def test_the_initiator_may_read_only_the_control_partition(exercised: Exercised):
    """The initiator reads the operator's control record and clears a carried-out rollback;
    its role refuses a GetItem of a round record. (It may update round records: a new round's
    slots_ready flag, and abandoning a round whose initiator died before setting it.)"""
    from sfl.state.control import control_partition

    outputs = exercised.deployment.outputs
    policies = policies_of(exercised, "initiator")
    table = (
        f"arn:aws:dynamodb:{exercised.account.region}:{exercised.account.account_id}:table/"
        f"{outputs['RoundsTableName']}"
    )
    for action in ("dynamodb:GetItem", "dynamodb:UpdateItem"):
        control = Request(action, table, {"dynamodb:LeadingKeys": (control_partition("default"),)})
        a_round = Request(action, table, {"dynamodb:LeadingKeys": ("default",)})
        assert policies.allows(control, {})
        assert policies.allows(a_round, {}) is (action == "dynamodb:UpdateItem")


def test_a_device_reads_its_model_and_assignment_but_no_lineage_and_lists_nothing(
    exercised: Exercised,
):
    """The device role allows what the edge client read and refuses a version's lineage
    (every round's participants and held-out accuracy), the rest of the models bucket, and
    any listing of it."""
    from sfl.core import layout

    policies = policies_of(exercised, "devices")
    models = f"arn:aws:s3:::{exercised.deployment.outputs['ModelsBucketName']}"
    me = {THING_NAME: "device-a"}
    reads = {
        r.resource.removeprefix(f"{models}/")
        for r, _ in requests_of(exercised, [f"device:{c}" for c in CLIENTS])
        if r.action == "s3:GetObject" and r.resource.startswith(f"{models}/")
    }
    assert reads == {layout.ASSIGNMENT_KEY, layout.model_key(0), layout.model_key(1)} | {
        layout.PROMOTED_MODEL_KEY
    }
    for key in reads:
        assert policies.allows(Request("s3:GetObject", f"{models}/{key}"), me)
    for key in (layout.lineage_key(1), layout.state_key(1), layout.EVAL_DATA_KEY):
        assert not policies.allows(Request("s3:GetObject", f"{models}/{key}"), me), key
    for prefix in ("", layout.MODELS_PREFIX, layout.ASSIGNMENT_KEY):
        listing = Request("s3:ListBucket", models, {"s3:prefix": (prefix,)})
        assert not policies.allows(listing, me), prefix


def test_the_averager_deletes_an_update_only_naming_its_etag(exercised: Exercised):
    """A refused upload is deleted with If-Match on its ETag; the role refuses a delete
    without one, so no bug can remove an update it has not looked at."""
    from sfl.core import layout

    policies = policies_of(exercised, "averager")
    updates = exercised.deployment.outputs["UpdatesBucketName"]
    deletes = [r for r, _ in requests_of(exercised, ["averager"]) if r.action == "s3:DeleteObject"]
    assert deletes and all(r.context.get("s3:if-match") for r in deletes)
    blind = Request("s3:DeleteObject", f"arn:aws:s3:::{updates}/{layout.update_key('x', 1)}")
    assert not policies.allows(blind, {})


def test_only_the_averager_may_decrypt_an_update_and_devices_only_encrypt(exercised: Exercised):
    """The updates key's policy, resolved: the averager's role is the one principal that may
    decrypt (no shard function in this stack); the device role may only ask for a data key,
    through S3; the account may use the key for nothing, so no IAM policy can grant its use."""
    key = key_policy(exercised)
    averager, devices = role_arn(exercised, "averager"), role_arn(exercised, "devices")
    root = f"arn:aws:iam::{exercised.account.account_id}:root"
    assert key.principals("kms:Decrypt") == {averager}
    assert key.principals("kms:GenerateDataKey") == {devices}
    for action in ("kms:Encrypt", "kms:ReEncryptFrom", "kms:CreateGrant", "kms:GenerateDataKey"):
        assert root not in key.principals(action), action
    arn = exercised.account.bucket_keys[exercised.deployment.outputs["UpdatesBucketName"]]
    via_s3 = {"kms:ViaService": (f"s3.{exercised.account.region}.amazonaws.com",)}
    decrypt = Request("kms:Decrypt", arn, via_s3)
    assert key.allows(decrypt, averager)
    assert not key.allows(decrypt, devices)
    assert not key.allows(Request("kms:Decrypt", arn), averager)  # only through S3
    assert not key.allows(Request("kms:GenerateDataKey", arn), devices)


def test_a_device_may_store_an_update_only_under_the_updates_key(exercised: Exercised):
    """The device role refuses a PutObject naming SSE-S3 or another KMS key: either would
    let whoever may read the bucket read the update."""
    from sfl.core import layout

    policies = policies_of(exercised, "devices")
    outputs = exercised.deployment.outputs
    key = exercised.account.bucket_keys[outputs["UpdatesBucketName"]]
    update = f"arn:aws:s3:::{outputs['UpdatesBucketName']}/{layout.update_key('device-a', 3)}"
    me = {THING_NAME: "device-a"}

    def put(**headers: str) -> Request:
        return Request("s3:PutObject", update, {k: (v,) for k, v in headers.items()})

    sse, kms_key = (
        "s3:x-amz-server-side-encryption",
        "s3:x-amz-server-side-encryption-aws-kms-key-id",
    )
    assert policies.allows(put(), me)  # the bucket's default: its own key
    assert policies.allows(put(**{sse: "aws:kms", kms_key: key}), me)
    assert not policies.allows(put(**{sse: "AES256"}), me)
    other = key.rsplit("/", 1)[0] + "/another-key"
    assert not policies.allows(put(**{sse: "aws:kms", kms_key: other}), me)


def test_devices_store_updates_with_one_put_object_never_multipart(exercised: Exercised):
    """A multipart upload to an SSE-KMS bucket needs kms:Decrypt (S3 decrypts the parts to
    assemble them), which devices must not have: the edge client sends each update or decline
    in one PutObject (up to 5 GB; an update is bounded by sfl.max_update_bytes)."""
    updates = exercised.deployment.outputs["UpdatesBucketName"]
    writes = [
        c.operation
        for principal in ROLES["devices"]
        for c in exercised.recorder.of(principal)
        if c.service == "s3" and c.params.get("Bucket") == updates
    ]
    assert writes and set(writes) == {"PutObject"}
