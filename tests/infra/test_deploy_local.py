"""The synthesized template deploys into the local emulator, and a round runs on what it made.

moto's CloudFormation creates the stack from the template exactly as synthesized, after the
bootstrap a real account would have (the version parameter, the asset bucket with the zipped
file assets). What the emulator cannot run, the test does in its place, from the template's
own data, and says so:

- Lambda-backed custom resources (CDK's S3 auto-delete and notifications handlers, the
  AwsCustomResource that asks the averager for model version 0) are removed before create;
  the test applies the notification configuration from the custom resource's properties and
  makes the bootstrap call from its ``Create`` request.
- moto has no CloudFormation model for some types (listed in ``NOT_EMULATED``); it skips
  them. The component's default configuration is read from the template instead.
- moto does not run Lambda code, fire schedules or deliver S3 events: the test invokes the
  handlers with the deployed functions' environment, the schedule rule's target input, and
  S3 event records for the keys the deployed notification filter matches.

So the round proves that code and template agree on names, keys and event wiring.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
from stack_template import Synthesized

pytestmark = [
    pytest.mark.slow,
    # moto warns, from its server thread, once per resource type it has no model for.
    pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning"),
]

STACK_NAME = "Sfl-Federation"
CLIENTS = ["device-a", "device-b"]
# Types moto's CloudFormation skips (no model): none of them carries data the round needs;
# the component's configuration is read from the template instead.
NOT_EMULATED = {
    "AWS::S3::BucketPolicy",
    "AWS::SQS::QueuePolicy",
    "AWS::Lambda::EventInvokeConfig",
    "AWS::IoT::ThingGroup",
    "AWS::GreengrassV2::ComponentVersion",
    "AWS::CloudWatch::Alarm",
    "AWS::SNS::TopicPolicy",
}
# Lambda-backed custom resources: removed before create, their effect applied by the test.
APPLIED_BY_TEST = {"Custom::S3AutoDeleteObjects", "Custom::S3BucketNotifications", "Custom::AWS"}


# --- the emulator and the deployment ---------------------------------------------------------


@pytest.fixture(scope="module")
def local_aws() -> Iterator[Any]:
    from sfl.local.emulator import LocalAws

    with LocalAws() as aws:
        # moto would try Docker to run a function's code (an S3 notification or an invoke
        # from the averager): answer such invokes without running anything.
        _moto_config(aws.endpoint_url, {"lambda": {"use_docker": False}})
        try:
            yield aws
        finally:
            _moto_config(aws.endpoint_url, {"lambda": {"use_docker": True}})


def _moto_config(endpoint_url: str, config: dict[str, Any]) -> None:
    request = urllib.request.Request(  # noqa: S310 (the local emulator's own address)
        f"{endpoint_url}/moto-api/config", data=json.dumps(config).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status in {200, 201}


@dataclass
class Deployment:
    aws: Any
    template: dict[str, Any]
    removed: dict[str, dict[str, Any]]  # custom resources, by logical id
    physical: dict[str, str]  # logical id -> physical id
    types: dict[str, str]  # logical id -> type, as the emulator created them
    outputs: dict[str, str]
    account: str

    def resolve(self, value: Any) -> Any:
        """Resolve the intrinsics CDK emits here against the deployed stack."""
        if isinstance(value, dict) and len(value) == 1:
            ((name, arg),) = value.items()
            if name == "Ref":
                return self._ref(arg)
            if name == "Fn::GetAtt":
                return self._arn(arg[0]) if arg[1] == "Arn" else pytest.fail(f"GetAtt {arg}")
            if name == "Fn::Join":
                return arg[0].join(str(self.resolve(part)) for part in arg[1])
            if name == "Fn::Sub" and isinstance(arg, str):
                for pseudo in ("AWS::AccountId", "AWS::Region", "AWS::Partition"):
                    arg = arg.replace("${" + pseudo + "}", self._ref(pseudo))
                return arg
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def _ref(self, name: str) -> str:
        pseudo = {
            "AWS::Region": self.aws.region,
            "AWS::AccountId": self.account,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        }
        return pseudo[name] if name in pseudo else self.physical[name]

    def _arn(self, logical: str) -> str:
        kind = self.types[logical]
        if kind == "AWS::Lambda::Function":
            config = self.aws.client("lambda").get_function(FunctionName=self.physical[logical])
            return str(config["Configuration"]["FunctionArn"])
        if kind == "AWS::S3::Bucket":
            return f"arn:aws:s3:::{self.physical[logical]}"
        raise AssertionError(f"no ARN rule for {kind}")

    def function_environment(self, output: str) -> dict[str, str]:
        config = self.aws.client("lambda").get_function_configuration(
            FunctionName=self.outputs[output]
        )
        return dict(config["Environment"]["Variables"])


@pytest.fixture(scope="module")
def deployment(local_aws: Any, synthesized: Synthesized) -> Deployment:
    aws = local_aws
    account = aws.client("sts").get_caller_identity()["Account"]
    bootstrap(aws, synthesized, account)

    template = json.loads(synthesized.template_path.read_text())
    removed = {
        logical: resource
        for logical, resource in template["Resources"].items()
        if resource["Type"].startswith("Custom::")
    }
    assert {r["Type"] for r in removed.values()} == APPLIED_BY_TEST
    deployable = json.loads(json.dumps(template))
    for logical in removed:
        del deployable["Resources"][logical]
    for resource in deployable["Resources"].values():
        depends = resource.get("DependsOn")
        if depends is not None:
            kept = [
                d for d in ([depends] if isinstance(depends, str) else depends) if d not in removed
            ]
            if kept:
                resource["DependsOn"] = kept
            else:
                del resource["DependsOn"]

    cloudformation = aws.client("cloudformation")
    cloudformation.create_stack(
        StackName=STACK_NAME,
        TemplateBody=json.dumps(deployable),
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
    )
    stack = cloudformation.describe_stacks(StackName=STACK_NAME)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    summaries = cloudformation.list_stack_resources(StackName=STACK_NAME)["StackResourceSummaries"]
    return Deployment(
        aws=aws,
        template=template,
        removed=removed,
        physical={s["LogicalResourceId"]: s["PhysicalResourceId"] for s in summaries},
        types={s["LogicalResourceId"]: s["ResourceType"] for s in summaries},
        outputs={o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]},
        account=account,
    )


def bootstrap(aws: Any, synthesized: Synthesized, account: str) -> None:
    """What ``cdk bootstrap`` and ``cdk deploy``'s asset upload leave in an account."""
    aws.client("ssm").put_parameter(
        Name="/cdk-bootstrap/hnb659fds/version", Value="30", Type="String"
    )
    manifest = json.loads(
        (synthesized.assembly_dir / f"{synthesized.stack.artifact_id}.assets.json").read_text()
    )
    s3 = aws.client("s3")
    for asset in manifest["files"].values():
        source = synthesized.assembly_dir / asset["source"]["path"]
        body = _zip(source) if asset["source"]["packaging"] == "zip" else source.read_bytes()
        for destination in asset["destinations"].values():
            bucket = destination["bucketName"].replace("${AWS::AccountId}", account)
            bucket = bucket.replace("${AWS::Region}", aws.region)
            if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key=destination["objectKey"], Body=body)
    # The averager's image would be pushed to the bootstrap ECR repository; moto's Lambda
    # accepts the image URI without pulling it.
    assert len(manifest["dockerImages"]) == 1


def _zip(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(directory).as_posix())
    return buffer.getvalue()


# --- what was deployed -----------------------------------------------------------------------


def test_emulator_created_everything_but_the_listed_types(deployment: Deployment):
    in_template = {
        logical: r["Type"]
        for logical, r in deployment.template["Resources"].items()
        if logical not in deployment.removed
    }
    # (moto reports Lambda permissions and the role alias without a physical id.)
    created = {lg for lg in deployment.types if lg}
    assert created <= set(in_template)
    skipped_types = {kind for lg, kind in in_template.items() if lg not in created}
    assert skipped_types == NOT_EMULATED
    assert {in_template[lg] for lg in created}.isdisjoint(NOT_EMULATED)


def test_deployed_tables_are_the_shared_definitions(deployment: Deployment):
    from sfl.resources import CLIENTS_TABLE, ROUNDS_TABLE, TableSpec

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
    aliases = [
        iot.describe_role_alias(roleAlias=alias)["roleAliasDescription"]
        for alias in iot.list_role_aliases()["roleAliases"]
    ]
    assert [a["roleArn"] for a in aliases] == [role_arn]
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


def apply_bucket_notifications(deployment: Deployment) -> dict[str, Any]:
    """What CDK's notifications handler does: put the configuration from its properties."""
    (props,) = [
        deployment.resolve(r["Properties"])
        for r in deployment.removed.values()
        if r["Type"] == "Custom::S3BucketNotifications"
    ]
    s3 = deployment.aws.client("s3")
    s3.put_bucket_notification_configuration(
        Bucket=props["BucketName"],
        NotificationConfiguration=props["NotificationConfiguration"],
    )
    deployed: dict[str, Any] = s3.get_bucket_notification_configuration(Bucket=props["BucketName"])
    return deployed


def bootstrap_request(deployment: Deployment) -> dict[str, Any]:
    """The Lambda Invoke the deploy-time AwsCustomResource makes, resolved."""
    (resource,) = [r for r in deployment.removed.values() if r["Type"] == "Custom::AWS"]
    request: dict[str, Any] = json.loads(deployment.resolve(resource["Properties"]["Create"]))
    return request


def schedule_inputs(deployment: Deployment) -> dict[str, dict[str, Any]]:
    """Function name -> the event the deployed schedule rule sends it."""
    (rule,) = [lg for lg, kind in deployment.types.items() if kind == "AWS::Events::Rule"]
    events = deployment.aws.client("events")
    targets = events.list_targets_by_rule(Rule=deployment.physical[rule])["Targets"]
    return {target["Arn"].rsplit(":", 1)[-1]: json.loads(target["Input"]) for target in targets}


def device_environment(deployment: Deployment) -> dict[str, str]:
    """The environment the component's Run step gives the edge client (``Setenv`` from its
    default configuration); moto has no Greengrass model, so it is read from the template."""
    from sfl.recipes import CONFIGURATION_KEYS

    (component,) = [
        r
        for r in deployment.template["Resources"].values()
        if r["Type"] == "AWS::GreengrassV2::ComponentVersion"
    ]
    recipe = json.loads(deployment.resolve(component["Properties"]["InlineRecipe"]))
    configuration = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    return {
        key.variable: configuration[key.key]
        for key in CONFIGURATION_KEYS
        if key.step == "Run" and configuration[key.key]
    }


def notified(configuration: dict[str, Any], key: str) -> list[str]:
    """Function ARNs S3 would invoke for ObjectCreated on key under this configuration."""
    arns = []
    for target in configuration.get("LambdaFunctionConfigurations", []):
        rules = {r["Name"].lower(): r["Value"] for r in target["Filter"]["Key"]["FilterRules"]}
        created = any(e.startswith("s3:ObjectCreated:") for e in target["Events"])
        if (
            created
            and key.startswith(rules.get("prefix", ""))
            and key.endswith(rules.get("suffix", ""))
        ):
            arns.append(target["LambdaFunctionArn"])
    return arns


def s3_event(region: str, bucket: str, key: str, size: int, etag: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": region,
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {"key": quote_plus(key), "size": size, "eTag": etag},
                },
            }
        ]
    }


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


def test_one_round_runs_on_the_deployed_stack(
    deployment: Deployment, synthesized: Synthesized, tmp_path: Path
):
    from edge_client.client import EdgeClient
    from edge_client.settings import parse_settings
    from sfl import layout
    from sfl.local.emulator import lambda_environment
    from sfl.local.lambdas import LocalFunction
    from sfl.rounds import RoundState, RoundStore
    from sfl.splits import write_client_splits
    from sfl.tasks import load_task

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

    # 1. Deploy-time: notifications wired, model version 0 asked for.
    notifications = apply_bucket_notifications(deployment)
    request = bootstrap_request(deployment)
    assert request["parameters"]["FunctionName"] == outputs["AveragerFunctionName"]
    assert invoke_averager(json.loads(request["parameters"]["Payload"])) == {"bootstrap": "written"}
    s3.head_object(Bucket=outputs["ModelsBucketName"], Key=layout.model_key(0))

    # 2. Devices configured only by the component's default configuration (plus the
    #    emulator's endpoint, which a device would not have, and their data).
    configuration = device_environment(deployment)
    assert configuration["SFL_MODELS_BUCKET"] == outputs["ModelsBucketName"]
    assert configuration["AWS_REGION"] == aws.region
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
    started = run_initiator_zip(synthesized, initiator_env, ticks[outputs["InitiatorFunctionName"]])
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
    s3.head_object(Bucket=outputs["ModelsBucketName"], Key=layout.model_key(1))
    tick = invoke_averager(ticks[outputs["AveragerFunctionName"]])
    assert tick["round"] == 1
