"""The synthesized template in the local emulator: moto's CloudFormation creates the stack
exactly as synthesized, after the bootstrap a real account would have (the version
parameter, the asset bucket with the zipped file assets). What the emulator cannot run, the
helpers here do in its place, from the template's own data:

- Lambda-backed custom resources (CDK's S3 auto-delete and notifications handlers, the
  AwsCustomResource that asks the averager for model version 0) are removed before create;
  ``apply_bucket_notifications`` and ``bootstrap_request`` apply their effect.
- moto has no CloudFormation model for some types (``NOT_EMULATED``); it skips them.
- moto does not run Lambda code, fire schedules or deliver S3 events: tests invoke the
  handlers with the deployed functions' environment, the schedule rule's target input, and
  S3 event records for the keys the deployed notification filter matches.
"""

from __future__ import annotations

import io
import json
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
from stack_template import Synthesized

STACK_NAME = "Sfl-Federation"
# Types moto's CloudFormation skips (no model): none of them carries data a round needs;
# the component's configuration and deployment are read from the template instead.
NOT_EMULATED = {
    "AWS::S3::BucketPolicy",
    "AWS::SQS::QueuePolicy",
    "AWS::Lambda::EventInvokeConfig",
    "AWS::IoT::ThingGroup",
    "AWS::GreengrassV2::ComponentVersion",
    "AWS::GreengrassV2::Deployment",
    "AWS::CloudWatch::Alarm",
    "AWS::SNS::TopicPolicy",
}
# Lambda-backed custom resources: removed before create, their effect applied by the test.
APPLIED_BY_TEST = {"Custom::S3AutoDeleteObjects", "Custom::S3BucketNotifications", "Custom::AWS"}


@contextmanager
def local_aws_without_docker() -> Iterator[Any]:
    """The local endpoint; moto would try Docker to run a function's code (an S3
    notification or an invoke from the averager): it answers such invokes without running."""
    from sfl.local.emulator import LocalAws

    with LocalAws() as aws:
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
    stack_name: str
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
        """``Fn::GetAtt [logical, Arn]`` as CloudFormation documents it for each type."""
        kind = self.types[logical]
        name = self.physical[logical]
        prefix = f"arn:aws:{{}}:{self.aws.region}:{self.account}"
        if kind == "AWS::Lambda::Function":
            config = self.aws.client("lambda").get_function(FunctionName=name)
            return str(config["Configuration"]["FunctionArn"])
        if kind == "AWS::S3::Bucket":
            return f"arn:aws:s3:::{name}"
        if kind == "AWS::DynamoDB::Table":
            return f"{prefix.format('dynamodb')}:table/{name}"
        if kind == "AWS::Logs::LogGroup":
            return f"{prefix.format('logs')}:log-group:{name}:*"  # with ':*', as CFN returns it
        if kind == "AWS::SQS::Queue":
            return f"{prefix.format('sqs')}:{name.rsplit('/', 1)[-1]}"
        if kind == "AWS::IAM::Role":
            return f"arn:aws:iam::{self.account}:role/{name}"
        raise AssertionError(f"no ARN rule for {kind}")

    def role_policy_documents(self, role_name: str) -> dict[str, dict[str, Any]]:
        """The identity policies the template attaches to a role (inline AWS::IAM::Policy and
        AWS::IAM::ManagedPolicy), resolved against the deployed stack."""
        (role,) = [lg for lg, p in self.physical.items() if p == role_name]
        documents = {}
        for logical, resource in self.template["Resources"].items():
            if resource["Type"] not in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}:
                continue
            if {"Ref": role} in resource["Properties"].get("Roles", []):
                documents[logical] = self.resolve(resource["Properties"]["PolicyDocument"])
        inline = self.template["Resources"][role]["Properties"].get("Policies", [])
        for policy in inline:
            documents[policy["PolicyName"]] = self.resolve(policy["PolicyDocument"])
        return documents

    def function_environment(self, output: str) -> dict[str, str]:
        config = self.aws.client("lambda").get_function_configuration(
            FunctionName=self.outputs[output]
        )
        return dict(config["Environment"]["Variables"])

    def function_role_name(self, output: str) -> str:
        """The execution role of the function an output names."""
        config = self.aws.client("lambda").get_function_configuration(
            FunctionName=self.outputs[output]
        )
        return str(config["Role"]).rsplit("/", 1)[-1]


def deploy(aws: Any, synthesized: Synthesized, stack_name: str = STACK_NAME) -> Deployment:
    """Create the synthesized stack in the emulator, as ``cdk deploy`` would."""
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

    # moto cannot validate an output that reads an attribute of a type it has no model for.
    not_emulated = {lg for lg, r in template["Resources"].items() if r["Type"] in NOT_EMULATED}
    for name, output in list(deployable["Outputs"].items()):
        if any(lg in not_emulated for lg in _attributes_read(output["Value"])):
            del deployable["Outputs"][name]

    cloudformation = aws.client("cloudformation")
    cloudformation.create_stack(
        StackName=stack_name,
        TemplateBody=json.dumps(deployable),
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
    )
    stack = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    summaries = cloudformation.list_stack_resources(StackName=stack_name)["StackResourceSummaries"]
    return Deployment(
        aws=aws,
        stack_name=stack_name,
        template=template,
        removed=removed,
        physical={s["LogicalResourceId"]: s["PhysicalResourceId"] for s in summaries},
        types={s["LogicalResourceId"]: s["ResourceType"] for s in summaries},
        outputs={o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]},
        account=account,
    )


def _attributes_read(value: Any) -> list[str]:
    """Logical IDs whose attributes (Fn::GetAtt) a template value reads."""
    if isinstance(value, dict):
        if set(value) == {"Fn::GetAtt"}:
            return [value["Fn::GetAtt"][0]]
        return [lg for v in value.values() for lg in _attributes_read(v)]
    if isinstance(value, list):
        return [lg for v in value for lg in _attributes_read(v)]
    return []


def bootstrap(aws: Any, synthesized: Synthesized, account: str) -> None:
    """What ``cdk bootstrap`` and ``cdk deploy``'s asset upload leave in an account."""
    aws.client("ssm").put_parameter(
        Name="/cdk-bootstrap/hnb659fds/version", Value="30", Type="String", Overwrite=True
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
    """The environment the component's Run step gives the edge client (its ``Setenv``, with
    the default configuration); moto has no Greengrass model, so it is read from the
    template."""
    from sfl.recipes import run_environment

    return run_environment(component_recipe(deployment))


def component_recipe(deployment: Deployment) -> dict[str, Any]:
    """The component's recipe as CloudFormation would register it."""
    (component,) = [
        r
        for r in deployment.template["Resources"].values()
        if r["Type"] == "AWS::GreengrassV2::ComponentVersion"
    ]
    recipe: dict[str, Any] = json.loads(deployment.resolve(component["Properties"]["InlineRecipe"]))
    return recipe


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
