"""A deploy rehearsal: the synthesized template deploys into the local emulator, a round runs
on what it made, the Greengrass installer provisions a device against it, and destroying the
stack afterwards leaves nothing behind.

What is deployed is a user's app made by ``sfl new`` outside this repository, with its own
task, selection and quorum named by import path (``user_app``): the round trains the app's
model, picked by the app's selection running from the initiator's zip (torch cannot load
there).

moto's CloudFormation creates the stack from the template exactly as synthesized, after the
bootstrap a real account would have (the version parameter, the asset bucket with the zipped
file assets). What the emulator cannot run, the test plays from the template's own data
(``local_stack``), and says so:

- Lambda-backed custom resources run their functions' own code from the cloud assembly, with
  the requests CloudFormation sends and a ResponseURL the test serves (``custom_resources``):
  CDK's notifications handler puts the updates bucket's configuration, CDK's AwsCustomResource
  invokes the averager (moto's Lambda keeps the payload; the test runs the averager on it, as
  Lambda would), CDK's auto-delete handler empties the buckets at destroy, and the stack's
  clean-up frees the IoT policy and the device role.
- moto has no CloudFormation model for some types (listed in ``NOT_EMULATED``); it skips
  them. The component's recipe and the Greengrass deployment are read from the template; the
  thing group is created from it as CloudFormation would.
- ``destroy`` deletes in CloudFormation's order, derived from the template's dependency
  graph, each resource through its service's delete call (moto's stack deletion keeps no
  order and cannot delete IoT resources or managed policies), and fails where CloudFormation
  would.
- moto does not run Lambda code, fire schedules or deliver S3 events: the test invokes the
  handlers with the deployed functions' environment, the schedule rule's target input, and
  S3 event records for the keys the deployed notification configuration matches.

So the round proves that code and template agree on names, keys and event wiring, and the
installer and destroy prove the stack owns what a device's installation would otherwise leave.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from greengrass_installer import GreengrassInstaller, Provisioned, decommission
from iam_proof import CallRecorder
from local_stack import (
    CUSTOM_RESOURCE_TYPES,
    NOT_EMULATED,
    Deployment,
    component_recipe,
    create_thing_group,
    deploy,
    destroy,
    device_environment,
    lambda_queue,
    leftovers,
    local_aws_without_docker,
    notified,
    s3_event,
    schedule_inputs,
)
from stack_template import Synthesized
from user_app import PLUGINS

pytestmark = [
    pytest.mark.slow,
    # moto warns, from its server thread, once per resource type it has no model for.
    pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning"),
]

CLIENTS = ["device-a", "device-b"]
# --- the emulator and the deployment ---------------------------------------------------------


@pytest.fixture(scope="module")
def local_aws() -> Iterator[Any]:
    with local_aws_without_docker() as aws:
        yield aws


@pytest.fixture(scope="module")
def deployment(local_aws: Any, user_app_synthesized: Synthesized) -> Deployment:
    return deploy(local_aws, user_app_synthesized)


# --- what was deployed -----------------------------------------------------------------------


def test_emulator_created_everything_but_the_listed_types(deployment: Deployment):
    in_template = {
        logical: r["Type"]
        for logical, r in deployment.template["Resources"].items()
        if logical not in deployment.removed
    }
    # (moto reports Lambda permissions and the role alias without a physical id.)
    created = {lg for lg in deployment.types if lg and lg not in deployment.removed}
    assert created <= set(in_template)
    skipped_types = {kind for lg, kind in in_template.items() if lg not in created}
    assert skipped_types == NOT_EMULATED
    assert {in_template[lg] for lg in created}.isdisjoint(NOT_EMULATED)


def test_every_custom_resource_s_own_function_answered_its_create(deployment: Deployment):
    created = [(s.logical_id, s.resource_type, s.answer.status) for s in deployment.sent]
    assert sorted(created) == [
        (logical, resource["Type"], "SUCCESS")
        for logical, resource in sorted(deployment.removed.items())
    ]
    assert {s.request_type for s in deployment.sent} == {"Create"}
    assert {kind for _, kind, _ in created} == CUSTOM_RESOURCE_TYPES


def test_cdk_s_notifications_handler_put_the_template_s_configuration(deployment: Deployment):
    """CDK's inline handler, not the test, wired the updates bucket to the averager."""
    bucket = deployment.outputs["UpdatesBucketName"]
    deployed = deployment.aws.client("s3").get_bucket_notification_configuration(Bucket=bucket)
    (resource,) = [
        r for r in deployment.removed.values() if r["Type"] == "Custom::S3BucketNotifications"
    ]
    wanted = deployment.resolve(resource["Properties"]["NotificationConfiguration"])
    ((target,),) = [deployed["LambdaFunctionConfigurations"]]
    ((wanted_target,),) = [wanted["LambdaFunctionConfigurations"]]
    assert target["LambdaFunctionArn"] == wanted_target["LambdaFunctionArn"]
    assert target["Events"] == wanted_target["Events"]
    rules = {r["Name"].lower(): r["Value"] for r in target["Filter"]["Key"]["FilterRules"]}
    assert rules == {r["Name"]: r["Value"] for r in wanted_target["Filter"]["Key"]["FilterRules"]}


def test_deployed_tables_are_the_shared_definitions(deployment: Deployment):
    from sfl.core.resources import CLIENTS_TABLE, ROUNDS_TABLE, TableSpec

    def key_schema(spec: TableSpec) -> list[dict[str, str]]:
        keys = [{"AttributeName": spec.partition_key.name, "KeyType": "HASH"}]
        if spec.sort_key is not None:
            keys.append({"AttributeName": spec.sort_key.name, "KeyType": "RANGE"})
        return keys

    dynamodb = deployment.aws.client("dynamodb")
    for output, spec in (("ClientsTableName", CLIENTS_TABLE), ("RoundsTableName", ROUNDS_TABLE)):
        table = dynamodb.describe_table(TableName=deployment.outputs[output])["Table"]
        assert table["KeySchema"] == key_schema(spec)
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    # (moto's S3 model ignores bucket settings such as versioning and encryption; the
    # synthesis tests assert those on the template.)
    buckets = {b["Name"] for b in deployment.aws.client("s3").list_buckets()["Buckets"]}
    assert {deployment.outputs["ModelsBucketName"], deployment.outputs["UpdatesBucketName"]} <= (
        buckets
    )


def test_device_role_alias_and_invoke_permissions_exist(deployment: Deployment):
    role_name = deployment.outputs["TokenExchangeRoleName"]
    role_arn = deployment.aws.client("iam").get_role(RoleName=role_name)["Role"]["Arn"]
    iot = deployment.aws.client("iot")
    # (One emulator per process: other tests' stacks may be there too.)
    ours = [
        a for a in iot.list_role_aliases()["roleAliases"] if a.startswith(deployment.stack_name)
    ]
    assert ours == [deployment.outputs["TokenExchangeRoleAliasName"]]
    (alias,) = ours
    assert iot.describe_role_alias(roleAlias=alias)["roleAliasDescription"]["roleArn"] == role_arn
    policy = deployment.aws.client("lambda").get_policy(
        FunctionName=deployment.outputs["AveragerFunctionName"]
    )
    principals = {s["Principal"]["Service"] for s in json.loads(policy["Policy"])["Statement"]}
    assert principals == {"s3.amazonaws.com", "events.amazonaws.com"}


def test_functions_are_configured_with_the_deployed_names(deployment: Deployment):
    for output in ("InitiatorFunctionName", "AveragerFunctionName"):
        env = deployment.function_environment(output)
        assert env["SFL_MODELS_BUCKET"] == deployment.outputs["ModelsBucketName"]
        assert env["SFL_UPDATES_BUCKET"] == deployment.outputs["UpdatesBucketName"]
        assert env["SFL_CLIENTS_TABLE"] == deployment.outputs["ClientsTableName"]
        assert env["SFL_ROUNDS_TABLE"] == deployment.outputs["RoundsTableName"]
    averager = deployment.function_environment("AveragerFunctionName")
    assert averager["SFL_INITIATOR_FUNCTION"] == deployment.outputs["InitiatorFunctionName"]


# --- one round on the deployed resources -----------------------------------------------------


def run_initiator_zip(
    synthesized: Synthesized, env: dict[str, str], event: dict[str, Any]
) -> dict[str, Any]:
    """Run the initiator from its bundled zip contents, in a process where torch can't load."""
    code = synthesized.template_json["Resources"][
        synthesized.logical_id(synthesized.stack.rounds.initiator)
    ]["Properties"]["Code"]["S3Key"]
    asset = synthesized.assembly_dir / f"asset.{code.removesuffix('.zip')}"
    probe = textwrap.dedent(
        """
        import json, sys
        for heavy in ("torch", "numpy", "safetensors"):
            sys.modules[heavy] = None
        import handler, sfl
        assert sfl.__file__.startswith(sys.argv[2]), sfl.__file__

        class Context:
            function_name = "initiator"
            memory_limit_in_mb = 256
            aws_request_id = "local"
            invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:initiator"

            def get_remaining_time_in_millis(self):
                return 60_000

        result = handler.lambda_handler(json.loads(sys.argv[1]), Context())
        print("RESULT " + json.dumps(result))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(event), str(asset)],
        cwd=asset,
        env={
            **env,
            "PYTHONPATH": str(asset),
            "PYTHONDONTWRITEBYTECODE": "1",  # leave the asset as synthesized
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "POWERTOOLS_METRICS_DISABLED": "true",
            "POWERTOOLS_LOG_LEVEL": "WARNING",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    answer: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return answer


def test_one_round_of_the_apps_task_runs_on_the_deployed_stack(
    deployment: Deployment, user_app_synthesized: Synthesized, tmp_path: Path
):
    from edge_client.client import EdgeClient
    from edge_client.settings import parse_settings
    from sfl.core import layout
    from sfl.learning.splits import write_client_splits
    from sfl.learning.tasks import load_task
    from sfl.local.emulator import lambda_environment
    from sfl.local.lambdas import LocalFunction
    from sfl.state.rounds import RoundState, RoundStore

    aws = deployment.aws
    s3 = aws.client("s3")
    outputs = deployment.outputs
    endpoint_env = aws.env()
    initiator_env = {**deployment.function_environment("InitiatorFunctionName"), **endpoint_env}
    averager_env = {
        **deployment.function_environment("AveragerFunctionName"),
        **endpoint_env,
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }
    averager = LocalFunction("averager")

    def invoke_averager(event: dict[str, Any]) -> Any:
        with lambda_environment(averager_env):
            return averager.invoke(event)

    # 1. Deploy-time: CDK's handlers wired the notifications and asked, through Lambda's
    #    Invoke, for model version 0; Lambda runs the averager on what was queued.
    notifications = s3.get_bucket_notification_configuration(Bucket=outputs["UpdatesBucketName"])
    (queued,) = lambda_queue(aws).queued(outputs["AveragerFunctionName"])
    assert invoke_averager(queued) == {"bootstrap": "written"}
    s3.head_object(Bucket=outputs["ModelsBucketName"], Key=layout.model_key(0))

    # 2. Devices configured only by the component's default configuration (plus the
    #    emulator's endpoint, which a device would not have, and their data).
    configuration = device_environment(deployment)
    assert configuration["SFL_MODELS_BUCKET"] == outputs["ModelsBucketName"]
    assert configuration["AWS_REGION"] == aws.region
    assert configuration["SFL_TASK"] == PLUGINS["task"]  # the app's, named by import path
    task = load_task(configuration["SFL_TASK"])
    write_client_splits(task, tmp_path, len(CLIENTS), "iid", seed=3, client_ids=CLIENTS)
    devices = [
        EdgeClient(
            parse_settings(
                [],
                {
                    **configuration,
                    **endpoint_env,
                    "AWS_IOT_THING_NAME": client_id,
                    "SFL_DATA_DIR": str(tmp_path / client_id),
                },
            ),
            aws.clients(),
            task,
        )
        for client_id in CLIENTS
    ]
    for device in devices:
        device._data = task.load_client_data(device.settings.data_dir)
        device.heartbeat()

    # 3. The schedule's tick starts round 1 (initiator from its zip); the averager's tick
    #    finds nothing to do yet.
    ticks = schedule_inputs(deployment)
    assert set(ticks) == {outputs["InitiatorFunctionName"], outputs["AveragerFunctionName"]}
    assert initiator_env["SFL_SELECTION"] == PLUGINS["selection"]  # the app's, in the zip
    started = run_initiator_zip(
        user_app_synthesized, initiator_env, ticks[outputs["InitiatorFunctionName"]]
    )
    assert started["started"] is True and started["round"] == 1
    assert sorted(started["selected"]) == CLIENTS

    # 4. Each device answers; S3 would notify the averager of exactly these keys.
    averager_arn = deployment._arn(
        next(lg for lg, p in deployment.physical.items() if p == outputs["AveragerFunctionName"])
    )
    results = []
    for device in devices:
        assignment = device.poll()
        assert assignment is not None and assignment.round == 1
        device.answer(assignment)
        key = layout.update_key(device.settings.client_id, 1)
        head = s3.head_object(Bucket=outputs["UpdatesBucketName"], Key=key)
        assert notified(notifications, key) == [averager_arn]
        results.append(
            invoke_averager(
                s3_event(
                    aws.region,
                    outputs["UpdatesBucketName"],
                    key,
                    head["ContentLength"],
                    head["ETag"].strip('"'),
                )
            )
        )
    assert notified(notifications, "updates/device-a/notes.txt") == []
    assert [o["result"] for r in results for o in r["outcomes"]] == ["accepted", "accepted"]

    # 5. The round closed into model version 1 (and the averager chained the initiator by
    #    the deployed function's name, which the emulator answered).
    rounds = RoundStore(aws.clients().dynamodb, outputs["RoundsTableName"])
    closed = rounds.latest(initiator_env["SFL_EXPERIMENT"])
    assert closed is not None and closed.round == 1
    assert closed.status == RoundState.CLOSED
    assert closed.model_version == 1
    from sfl.learning import codec

    version_1 = codec.decode(
        s3.get_object(Bucket=outputs["ModelsBucketName"], Key=layout.model_key(1))["Body"].read()
    )
    reference = task.build_model(seed=0).state_dict()
    assert {k: tuple(v.shape) for k, v in version_1.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }  # the app's model, trained by the devices
    tick = invoke_averager(ticks[outputs["AveragerFunctionName"]])
    assert tick["round"] == 1


# --- a device installed, then cdk destroy ----------------------------------------------------


def provision_device(deployment: Deployment, thing_name: str) -> tuple[Provisioned, list[str]]:
    """The Greengrass installer, run as DeviceSetupCommand says, against the deployed stack;
    returns the device and the operations it called."""
    outputs = deployment.outputs
    recorder = CallRecorder()
    with recorder.active(), recorder.acting_as("installer"):
        device = GreengrassInstaller(deployment.aws).provision(
            thing_name=thing_name,
            thing_group_name=outputs["ThingGroupName"],
            thing_policy_name=outputs["DeviceIotPolicyName"],
            tes_role_name=outputs["TokenExchangeRoleName"],
            tes_role_alias_name=outputs["TokenExchangeRoleAliasName"],
        )
    return device, [c.operation for c in recorder.of("installer")]


def test_the_installer_finds_the_stack_s_policies_and_attaches_nothing(deployment: Deployment):
    outputs = deployment.outputs
    role = outputs["TokenExchangeRoleName"]
    assert create_thing_group(deployment) == outputs["ThingGroupName"]

    device, operations = provision_device(deployment, "device-c")

    assert device.created == []
    assert {"GetPolicy", "DescribeRoleAlias", "DescribeThingGroup"} <= set(operations)
    assert not {"CreatePolicy", "AttachRolePolicy", "CreateRole", "CreateRoleAlias"} & set(
        operations
    )
    (attached,) = deployment.aws.client("iam").list_attached_role_policies(RoleName=role)[
        "AttachedPolicies"
    ]
    nucleus = deployment.physical[deployment_logical_id(deployment, "AWS::IAM::ManagedPolicy")]
    assert attached == {"PolicyName": f"{role}Access", "PolicyArn": nucleus}
    iot = deployment.aws.client("iot")
    held = iot.list_attached_policies(target=device.certificate_arn)["policies"]
    assert [p["policyName"] for p in held] == [outputs["DeviceIotPolicyName"]]
    members = iot.list_things_in_thing_group(thingGroupName=outputs["ThingGroupName"])["things"]
    assert members == ["device-c"]


def test_the_stack_s_deployment_puts_its_component_version_on_its_thing_group(
    deployment: Deployment,
):
    """moto has no Greengrass: the deployment is read from the template and resolved."""
    (logical,) = [
        lg
        for lg, r in deployment.template["Resources"].items()
        if r["Type"] == "AWS::GreengrassV2::Deployment"
    ]
    props = deployment.template["Resources"][logical]["Properties"]
    recipe = component_recipe(deployment)
    ((name, spec),) = props["Components"].items()
    component = deployment_logical_id(deployment, "AWS::GreengrassV2::ComponentVersion")
    assert spec["ComponentVersion"] == {"Fn::GetAtt": [component, "ComponentVersion"]}
    assert (name, recipe["ComponentVersion"]) == (
        deployment.outputs["ComponentName"],
        deployment.outputs["ComponentVersion"],
    )
    group = deployment_logical_id(deployment, "AWS::IoT::ThingGroup")
    assert props["TargetArn"] == {"Fn::GetAtt": [group, "Arn"]}


def test_destroy_after_a_device_was_installed_leaves_nothing_of_the_stack(
    deployment: Deployment,
):
    """The device keeps its certificate attached to the stack's IoT policy, the stack's role
    holds a policy someone attached by hand, and the versioned models bucket holds every
    model version and an overwritten, deleted key. In CloudFormation's order, CDK's
    auto-delete handler empties each bucket before it goes and the stack's clean-up frees
    the IoT policy and the role before they go: the deletion completes."""
    iot = deployment.aws.client("iot")
    iam = deployment.aws.client("iam")
    s3 = deployment.aws.client("s3")
    role = deployment.outputs["TokenExchangeRoleName"]
    models = deployment.outputs["ModelsBucketName"]
    (certificate,) = iot.list_thing_principals(thingName="device-c")["principals"]
    log_manager = iam.create_policy(
        PolicyName="LogManagerByHand",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "logs:PutLogEvents", "Resource": "*"}],
            }
        ),
    )["Policy"]["Arn"]
    iam.attach_role_policy(RoleName=role, PolicyArn=log_manager)
    s3.put_bucket_versioning(Bucket=models, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"first", b"second"):
        s3.put_object(Bucket=models, Key="notes/operator.txt", Body=body)
    s3.delete_object(Bucket=models, Key="notes/operator.txt")
    stored = s3.list_object_versions(Bucket=models)
    assert len(stored["Versions"]) >= 3 and len(stored["DeleteMarkers"]) == 1
    already = len(deployment.sent)

    order = destroy(deployment)

    # Each custom resource's own function got its Delete before what it names went.
    deletes = deployment.sent[already:]
    assert {(s.request_type, s.answer.status) for s in deletes} == {("Delete", "SUCCESS")}
    assert sorted(s.logical_id for s in deletes) == sorted(deployment.removed)
    for sent in deletes:
        for named in _named(deployment.removed[sent.logical_id]):
            assert order.index(sent.logical_id) < order.index(named), (sent.logical_id, named)
    policy = deployment_logical_id(deployment, "AWS::IoT::Policy")
    (cleanup,) = [
        lg for lg, r in deployment.removed.items() if r["Type"] == "Custom::DestroyCleanup"
    ]
    role_logical = next(lg for lg, p in deployment.physical.items() if p == role)
    assert order.index(cleanup) < min(order.index(policy), order.index(role_logical))

    remaining = leftovers(
        deployment.aws, deployment.stack_name, physical=deployment.physical.values()
    )
    # moto's Lambda, invoked by the S3 notification, logs to /aws/lambda/<name> whatever the
    # function's LoggingConfig says; on AWS the functions log to the stack's own groups.
    remaining["log groups"] = [
        g for g in remaining["log groups"] if not g.startswith("/aws/lambda/")
    ]
    assert remaining == {kind: [] for kind in remaining}
    assert deployment.deleted >= set(deployment.physical) - {""}
    # The updates key is not deleted at once (KMS cannot): scheduled for the end of its
    # 7-day waiting period, and unusable until then.
    (key,) = [p for lg, p in deployment.physical.items() if deployment.types[lg] == "AWS::KMS::Key"]
    metadata = deployment.aws.client("kms").describe_key(KeyId=key)["KeyMetadata"]
    assert metadata["KeyState"] == "PendingDeletion" and metadata["Enabled"] is False
    waiting = metadata["DeletionDate"].timestamp() - time.time()
    assert 6 * 86_400 < waiting <= 7 * 86_400
    # What destroy leaves, as the README says: the device's thing and certificate (holding
    # no policy now), and the policy attached by hand (detached, not deleted).
    assert iot.list_attached_policies(target=certificate)["policies"] == []
    assert iot.describe_thing(thingName="device-c")["thingName"] == "device-c"
    assert iam.get_policy(PolicyArn=log_manager)["Policy"]["AttachmentCount"] == 0
    decommission(deployment.aws, Provisioned("device-c", certificate, certificate.rsplit("/")[-1]))
    iam.delete_policy(PolicyArn=log_manager)


def _named(resource: dict[str, Any]) -> set[str]:
    """The resources a custom resource's properties name (other than its function)."""
    from local_stack import _refs

    properties = {k: v for k, v in resource["Properties"].items() if k != "ServiceToken"}
    return set(_refs(properties))


def test_without_the_stack_s_access_policy_the_installer_s_own_is_left_behind(
    local_aws: Any, synthesized: Synthesized
):
    """Why the stack owns '<role>Access': without it the installer creates and attaches its
    own, which destroy's clean-up detaches so the role goes, but which stays in the account."""
    nucleus = synthesized.logical_id(synthesized.stack.edge.nucleus_policy)
    unowned = deploy(local_aws, synthesized, "Sfl-Unowned", without=frozenset({nucleus}))
    create_thing_group(unowned)
    role = unowned.outputs["TokenExchangeRoleName"]

    device, operations = provision_device(unowned, "device-d")
    assert device.created == [f"iam policy {role}Access (attached to {role})"]
    assert "AttachRolePolicy" in operations
    decommission(local_aws, device)

    destroy(unowned)

    assert leftovers(local_aws, unowned.stack_name)["iam policies"] == [f"{role}Access"]
    assert leftovers(local_aws, unowned.stack_name)["roles"] == []
    iam = local_aws.client("iam")
    policies = iam.list_policies(Scope="Local")["Policies"]
    (access,) = [p for p in policies if p["PolicyName"] == f"{role}Access"]
    assert access["AttachmentCount"] == 0


def deployment_logical_id(deployment: Deployment, resource_type: str) -> str:
    (logical,) = [
        lg for lg, r in deployment.template["Resources"].items() if r["Type"] == resource_type
    ]
    return logical
