"""The synthesized template in the local emulator: moto's CloudFormation creates the stack
exactly as synthesized, after the bootstrap a real account would have (the version
parameter, the asset bucket with the zipped file assets). What the emulator cannot run, the
helpers here do in its place, from the template's own data:

- Lambda-backed custom resources (CDK's S3 auto-delete and notifications handlers, the
  AwsCustomResource that asks the averager for model version 0, the destroy clean-up): moto
  would hand them to Docker, so they are left out of what it creates, and CloudFormation's
  part is played here (``custom_resources``): each function's own code, from its synthesized
  asset, gets the Create request once moto made everything it needs, and the Delete request
  at its place in ``destroy``; its answer at the ResponseURL must be SUCCESS.
- moto's Lambda without Docker answers an asynchronous Invoke and forgets it: ``LambdaQueue``
  keeps each one's payload (``queued``), and the test runs the function on it, as Lambda would.
- moto has no CloudFormation model for some types (``NOT_EMULATED``); it skips them. Its
  model of ``AWS::KMS::Key`` reads the key's tags as the KMS API spells them (``TagKey``,
  ``TagValue``), not as CloudFormation does (``Key``, ``Value``): ``deploy`` respells them;
  and it keeps the key policy as the template's object, where its KMS expects the JSON text
  that ``GetKeyPolicy`` returns: ``deploy`` stores the resolved policy so.
- moto's stack deletion deletes in no particular order and cannot delete IoT resources or
  managed policies: ``destroy`` deletes in CloudFormation's order, derived from the
  template's dependency graph (dependents first), each resource through its service's delete
  call, with the stack ``DELETE_IN_PROGRESS`` meanwhile.
- moto does not run Lambda code, fire schedules or deliver S3 events: tests invoke the
  handlers with the deployed functions' environment, the schedule rule's target input, and
  S3 event records for the keys the deployed notification configuration matches.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
import threading
import urllib.request
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote

import pytest
from custom_resources import Answer, FunctionCode, cloudformation_request, code_folder, invoke
from stack_template import REPO_ROOT, Synthesized

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
# Lambda-backed custom resources: left out of what moto creates, their functions' own code
# run with CloudFormation's requests.
CUSTOM_RESOURCE_TYPES = {
    "Custom::S3AutoDeleteObjects",
    "Custom::S3BucketNotifications",
    "Custom::AWS",
    "Custom::DestroyCleanup",
}


def cleanup_handler() -> Any:
    """The destroy clean-up's Lambda module (``lambdas/cleanup/handler.py``), loaded from its
    file as the Lambda runtime loads it; no bytecode is written beside it (it is the asset)."""
    name = "sfl_destroy_cleanup_handler"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "lambdas" / "cleanup" / "handler.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes
    return module


class LambdaQueue:
    """WSGI middleware in front of moto: keeps the payload of every asynchronous Invoke
    (``InvocationType: Event``) it passes on. Lambda would queue it and run the function;
    moto's Lambda without Docker answers 202 and forgets it, so the test runs the function
    on what was queued."""

    _INVOKE = re.compile(r"/2015-03-31/functions/([^/]+)/invocations")

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self._queued: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        invoked = self._INVOKE.fullmatch(environ.get("PATH_INFO", ""))
        if (
            invoked is not None
            and environ.get("REQUEST_METHOD") == "POST"
            and environ.get("HTTP_X_AMZ_INVOCATION_TYPE") == "Event"
        ):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            with self._lock:
                self._queued.append((unquote(invoked.group(1)), body))
        return self.app(environ, start_response)

    def queued(self, function_name: str) -> list[Any]:
        """The payloads asynchronously sent to a function (by name or ARN), oldest first."""
        with self._lock:
            return [
                json.loads(body)
                for name, body in self._queued
                if name.rsplit(":", 1)[-1] == function_name
            ]


# The queue of each emulator local_aws_without_docker started, by endpoint.
_LAMBDA: dict[str, LambdaQueue] = {}


@contextmanager
def local_aws_without_docker() -> Iterator[Any]:
    """The local endpoint; moto would try Docker to run a function's code (an S3
    notification or an invoke from the averager): it answers such invokes without running,
    and ``LambdaQueue`` keeps the asynchronous ones' payloads."""
    from sfl.local.emulator import LocalAws

    with LocalAws() as aws:
        _moto_config(aws.endpoint_url, {"lambda": {"use_docker": False}})
        server = aws._server._server  # the WSGI server moto's thread runs
        front = LambdaQueue(server.app)
        server.app = front
        _LAMBDA[aws.endpoint_url] = front
        try:
            yield aws
        finally:
            del _LAMBDA[aws.endpoint_url]
            _moto_config(aws.endpoint_url, {"lambda": {"use_docker": True}})


def lambda_queue(aws: Any) -> LambdaQueue:
    """The emulator's ``LambdaQueue`` (only local_aws_without_docker's emulators have one)."""
    return _LAMBDA[aws.endpoint_url]


def _moto_config(endpoint_url: str, config: dict[str, Any]) -> None:
    request = urllib.request.Request(  # noqa: S310 (the local emulator's own address)
        f"{endpoint_url}/moto-api/config", data=json.dumps(config).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status in {200, 201}


@dataclass(frozen=True)
class Sent:
    """A request CloudFormation sent a custom resource's function, and its answer."""

    request_type: str
    logical_id: str
    resource_type: str
    answer: Answer


@dataclass
class Deployment:
    aws: Any
    stack_name: str
    stack_id: str
    template: dict[str, Any]
    assembly_dir: Path  # the cloud assembly: the functions' code
    removed: dict[str, dict[str, Any]]  # custom resources (not created by moto), by logical id
    physical: dict[str, str]  # logical id -> physical id
    types: dict[str, str]  # logical id -> type, as created (moto's, then the custom resources)
    outputs: dict[str, str]
    account: str
    deleted: set[str] = field(default_factory=set)  # logical IDs destroy already deleted
    sent: list[Sent] = field(default_factory=list)  # custom resource requests, in order

    def send(self, logical: str, request_type: str) -> Answer:
        """CloudFormation's request to a custom resource's function (its own code, from the
        cloud assembly), and the answer the function sent back."""
        resource = self.removed[logical]
        properties = self.resolve(resource["Properties"])
        event = cloudformation_request(
            request_type,
            stack_id=self.stack_id,
            logical_id=logical,
            resource_type=resource["Type"],
            service_token=properties["ServiceToken"],
            properties=properties,
            physical_id=None if request_type == "Create" else self.physical[logical],
        )
        (function,) = _refs(resource["Properties"]["ServiceToken"])
        with self.function_code(function) as code:
            answer = invoke(code, event, self.aws.env())
        self.sent.append(Sent(request_type, logical, resource["Type"], answer))
        return answer

    @contextmanager
    def function_code(self, logical: str) -> Iterator[FunctionCode]:
        """A deployed function's code (its asset in the cloud assembly), runtime and
        environment, as the template gives them."""
        props = self.template["Resources"][logical]["Properties"]
        environment = self.resolve(props.get("Environment", {}).get("Variables", {}))
        with code_folder(self.template["Resources"][logical], self.assembly_dir) as folder:
            yield FunctionCode(
                name=self.physical[logical],
                runtime=props["Runtime"],
                handler=props["Handler"],
                code=folder,
                environment={k: str(v) for k, v in environment.items()},
                timeout=int(props.get("Timeout", 3)),
            )

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
            "AWS::StackName": self.stack_name,
        }
        if name in pseudo:
            return pseudo[name]
        if name == "AWS::StackId":
            (stack,) = self.aws.client("cloudformation").describe_stacks(StackName=self.stack_name)[
                "Stacks"
            ]
            return str(stack["StackId"])
        if self.types.get(name) == "AWS::IoT::Policy":
            # Ref is the policy's name (moto's physical id is not).
            return str(self.resolve(self.template["Resources"][name]["Properties"]["PolicyName"]))
        return self.physical[name]

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
        if kind == "AWS::IoT::Policy":
            return f"{prefix.format('iot')}:policy/{self._ref(logical)}"
        if kind == "AWS::KMS::Key":
            return f"{prefix.format('kms')}:key/{name}"  # Ref is the key's id
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


def deploy(
    aws: Any,
    synthesized: Synthesized,
    stack_name: str = STACK_NAME,
    *,
    without: frozenset[str] = frozenset(),
) -> Deployment:
    """Create the synthesized stack in the emulator, as ``cdk deploy`` would; ``without``
    names resources to leave out (to show what they are for)."""
    account = aws.client("sts").get_caller_identity()["Account"]
    bootstrap(aws, synthesized, account)

    template = json.loads(synthesized.template_path.read_text())
    for logical in without:
        del template["Resources"][logical]
    for name, output in list(template["Outputs"].items()):
        if set(_refs(output["Value"])) & without:
            del template["Outputs"][name]
    # A left-out resource named in a list (the clean-up's owned policies, a condition's ARNs)
    # is dropped from it; named anywhere else, the template would not deploy.
    template["Resources"] = _drop_list_references(template["Resources"], without)
    assert not set(_refs(template["Resources"])) & without
    removed = {
        logical: resource
        for logical, resource in template["Resources"].items()
        if resource["Type"].startswith("Custom::")
    }
    assert {r["Type"] for r in removed.values()} <= CUSTOM_RESOURCE_TYPES
    deployable = json.loads(json.dumps(template))
    for logical in removed:
        del deployable["Resources"][logical]
    for resource in deployable["Resources"].values():
        if resource["Type"] == "AWS::KMS::Key" and "Tags" in resource["Properties"]:
            resource["Properties"]["Tags"] = [
                {"TagKey": t["Key"], "TagValue": t["Value"]} for t in resource["Properties"]["Tags"]
            ]
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
    deployment = Deployment(
        aws=aws,
        stack_name=stack_name,
        stack_id=stack["StackId"],
        template=template,
        assembly_dir=synthesized.assembly_dir,
        removed=removed,
        physical={s["LogicalResourceId"]: s["PhysicalResourceId"] for s in summaries},
        types={s["LogicalResourceId"]: s["ResourceType"] for s in summaries},
        outputs={o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]},
        account=account,
    )
    _store_key_policies(deployment)
    # Nothing in the template needs a custom resource and none needs another, so
    # CloudFormation creates them last, at once: each function gets its Create.
    assert not set(_refs(deployable)) & set(removed)
    assert deletion_waves(template["Resources"], set(removed)) == [sorted(removed)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        sent = pool.map(lambda logical: deployment.send(logical, "Create"), removed)
        answers = dict(zip(removed, sent, strict=True))
    for logical, answer in answers.items():
        assert answer.status == "SUCCESS", f"{logical}: {answer.reason}\n{answer.logs[-4000:]}"
        deployment.physical[logical] = answer.physical_id
        deployment.types[logical] = removed[logical]["Type"]
    return deployment


def _store_key_policies(deployment: Deployment) -> None:
    """Each KMS key's policy as KMS holds it: the template's, resolved, as JSON text."""
    from moto.kms.models import kms_backends

    backend = kms_backends[deployment.account][deployment.aws.region]
    for logical, kind in deployment.types.items():
        if kind == "AWS::KMS::Key":
            policy = deployment.template["Resources"][logical]["Properties"]["KeyPolicy"]
            key = backend.keys[deployment.physical[logical]]
            key.policy = json.dumps(deployment.resolve(policy))


def _drop_list_references(value: Any, gone: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: _drop_list_references(v, gone) for k, v in value.items()}
    if isinstance(value, list):
        return [
            _drop_list_references(v, gone)
            for v in value
            if not (isinstance(v, dict) and set(_refs(v)) & gone and len(v) == 1)
        ]
    return value


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
    from sfl.build.recipes import run_environment

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


# --- cdk destroy -----------------------------------------------------------------------------


class StackDeleteFailed(AssertionError):
    """CloudFormation could not delete a resource (the stack would be DELETE_FAILED)."""


def create_thing_group(deployment: Deployment) -> str:
    """Create the stack's thing group as CloudFormation would (moto has no model for it)."""
    (logical,) = [
        lg
        for lg, r in deployment.template["Resources"].items()
        if r["Type"] == "AWS::IoT::ThingGroup"
    ]
    props = deployment.template["Resources"][logical]["Properties"]
    name = str(deployment.resolve(props["ThingGroupName"]))
    deployment.aws.client("iot").create_thing_group(thingGroupName=name)
    deployment.physical[logical] = name
    deployment.types[logical] = "AWS::IoT::ThingGroup"
    return name


def destroy(deployment: Deployment) -> list[str]:
    """``cdk destroy`` as CloudFormation deletes a stack: the stack ``DELETE_IN_PROGRESS``,
    then the resources in waves from the template's dependency graph (a resource goes once
    nothing left needs it; a wave's resources at once, as CloudFormation does), stopping after
    a wave in which one failed (``DELETE_FAILED``). A custom resource gets its function's
    Delete request (its own code: CDK's auto-delete empties its bucket, the clean-up frees the
    IoT policy and the role); any other resource its service's delete call (moto's own stack
    deletion tries resources in no order and cannot delete IoT resources or managed
    policies). A second call, like a retried stack deletion, goes on with what is left.
    Returns the logical IDs deleted, wave by wave."""
    resources = deployment.template["Resources"]
    present = {
        lg: kind
        for lg, kind in deployment.types.items()
        # moto skipped the types it has no model for; the test may have made one in its place
        if lg and (kind not in NOT_EMULATED or deployment.physical.get(lg))
    }

    def delete(logical: str) -> None:
        if logical in deployment.removed:
            answer = deployment.send(logical, "Delete")
            if answer.status != "SUCCESS":
                raise AssertionError(f"{answer.reason}\n{answer.logs[-4000:]}")
        else:
            _delete(deployment, logical, present[logical], resources[logical])

    deleted: list[str] = []
    _set_stack_status(deployment, "DELETE_IN_PROGRESS")
    with ThreadPoolExecutor(max_workers=4) as pool:
        for wave in deletion_waves(resources, set(present) - deployment.deleted):
            failures = {}
            for logical, future in [(lg, pool.submit(delete, lg)) for lg in wave]:
                error = future.exception()
                if error is None:
                    deployment.deleted.add(logical)
                    deleted.append(logical)
                else:
                    failures[logical] = error
            if failures:
                _set_stack_status(deployment, "DELETE_FAILED")
                logical, error = next(iter(failures.items()))
                raise StackDeleteFailed(f"{logical} ({present[logical]}): {error}") from error
    _set_stack_status(deployment, "DELETE_COMPLETE")
    return deleted


def _set_stack_status(deployment: Deployment, status: str) -> None:
    """The stack's status as CloudFormation shows it while it deletes (what the clean-up's
    handler reads with DescribeStacks); moto's stack is in this process."""
    from moto.cloudformation.models import cloudformation_backends

    backend = cloudformation_backends[deployment.account][deployment.aws.region]
    stack = backend.stacks.get(deployment.stack_id) or backend.deleted_stacks[deployment.stack_id]
    stack.status = status
    if status == "DELETE_COMPLETE":
        backend.deleted_stacks[stack.stack_id] = backend.stacks.pop(stack.stack_id)


def deletion_waves(resources: dict[str, Any], present: set[str]) -> list[list[str]]:
    """CloudFormation's deletion order for ``present``: dependents before what they depend
    on (Ref, Fn::GetAtt, Fn::Sub, DependsOn); each wave holds what nothing left needs, which
    CloudFormation deletes at once."""

    def needs(logical: str) -> set[str]:
        resource = resources[logical]
        depends = resource.get("DependsOn", [])
        named = set([depends] if isinstance(depends, str) else depends)
        return (named | set(_refs(resource.get("Properties", {})))) & present

    needed = {lg: needs(lg) for lg in present}
    waves: list[list[str]] = []
    remaining = set(present)
    while remaining:
        still_needed = {n for lg in remaining for n in needed[lg]}
        wave = sorted(remaining - still_needed)
        assert wave, f"dependency cycle among {sorted(remaining)}"
        waves.append(wave)
        remaining -= set(wave)
    return waves


def deletion_order(resources: dict[str, Any], present: set[str]) -> list[str]:
    """The waves, one after the other."""
    return [lg for wave in deletion_waves(resources, present) for lg in wave]


_SUBSTITUTED = re.compile(r"\$\{([A-Za-z0-9]+)(?:\.[A-Za-z0-9.]+)?\}")


def _refs(value: Any) -> list[str]:
    """Logical IDs (and parameters) a template value names: Ref, Fn::GetAtt, Fn::Sub."""
    if isinstance(value, dict):
        if set(value) == {"Ref"}:
            return [value["Ref"]]
        if set(value) == {"Fn::GetAtt"}:
            return [value["Fn::GetAtt"][0]]
        if set(value) == {"Fn::Sub"}:
            text, variables = (
                (value["Fn::Sub"], {}) if isinstance(value["Fn::Sub"], str) else value["Fn::Sub"]
            )
            named = [n for n in _SUBSTITUTED.findall(text) if n not in variables]
            return named + _refs(variables)
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _delete(deployment: Deployment, logical: str, kind: str, resource: dict[str, Any]) -> None:
    """A resource's deletion through its service's own call, as CloudFormation's handler for
    its type makes it."""
    aws = deployment.aws
    props = resource.get("Properties", {})
    physical = deployment.physical.get(logical, "")
    if kind == "AWS::Lambda::Permission":
        pass  # nothing of its own remains once its function is gone
    elif kind == "AWS::IAM::Policy":
        for role in deployment.resolve(props["Roles"]):
            aws.client("iam").delete_role_policy(RoleName=role, PolicyName=props["PolicyName"])
    elif kind == "AWS::IAM::ManagedPolicy":
        iam = aws.client("iam")
        for role in deployment.resolve(props.get("Roles", [])):
            iam.detach_role_policy(RoleName=role, PolicyArn=physical)
        iam.delete_policy(PolicyArn=physical)
    elif kind == "AWS::IAM::Role":
        aws.client("iam").delete_role(RoleName=physical)
    elif kind == "AWS::S3::Bucket":
        aws.client("s3").delete_bucket(Bucket=physical)
    elif kind == "AWS::DynamoDB::Table":
        aws.client("dynamodb").delete_table(TableName=physical)
    elif kind == "AWS::Lambda::Function":
        aws.client("lambda").delete_function(FunctionName=physical)
    elif kind == "AWS::Logs::LogGroup":
        aws.client("logs").delete_log_group(logGroupName=physical)
    elif kind == "AWS::SQS::Queue":
        aws.client("sqs").delete_queue(QueueUrl=physical)
    elif kind == "AWS::SNS::Topic":
        aws.client("sns").delete_topic(TopicArn=physical)
    elif kind == "AWS::CloudWatch::Dashboard":
        aws.client("cloudwatch").delete_dashboards(DashboardNames=[physical])
    elif kind == "AWS::Events::Rule":
        events = aws.client("events")
        targets = events.list_targets_by_rule(Rule=physical)["Targets"]
        if targets:
            events.remove_targets(Rule=physical, Ids=[t["Id"] for t in targets])
        events.delete_rule(Name=physical)
    elif kind == "AWS::IoT::RoleAlias":
        aws.client("iot").delete_role_alias(roleAlias=deployment.resolve(props["RoleAlias"]))
    elif kind == "AWS::IoT::Policy":
        aws.client("iot").delete_policy(policyName=deployment.resolve(props["PolicyName"]))
    elif kind == "AWS::IoT::ThingGroup":
        aws.client("iot").delete_thing_group(thingGroupName=physical)
    elif kind == "AWS::KMS::Key":
        # KMS deletes no key at once: CloudFormation schedules it (PendingWindowInDays, 7 to
        # 30, default 30) and the key is PendingDeletion, unusable, until the window ends.
        aws.client("kms").schedule_key_deletion(
            KeyId=physical, PendingWindowInDays=int(props.get("PendingWindowInDays", 30))
        )
    else:
        raise AssertionError(f"destroy does not know how CloudFormation deletes a {kind}")


def leftovers(aws: Any, stack_name: str, physical: Collection[str] = ()) -> dict[str, list[str]]:
    """Everything of a stack's still in the account, by kind (its names carry the stack's).

    A KMS key has no name: its description carries the stack name the template was
    synthesised with, which other deployments of the same app share, so a key counts only if
    its id is among the deployment's ``physical`` ids."""
    iam = aws.client("iam")
    iot = aws.client("iot")
    found = {
        "roles": [r["RoleName"] for r in iam.list_roles()["Roles"]],
        "iam policies": [p["PolicyName"] for p in iam.list_policies(Scope="Local")["Policies"]],
        "buckets": [b["Name"] for b in aws.client("s3").list_buckets()["Buckets"]],
        "tables": aws.client("dynamodb").list_tables()["TableNames"],
        "queues": aws.client("sqs").list_queues().get("QueueUrls", []),
        "topics": [t["TopicArn"] for t in aws.client("sns").list_topics()["Topics"]],
        "alarms": [
            a["AlarmName"] for a in aws.client("cloudwatch").describe_alarms()["MetricAlarms"]
        ],
        "dashboards": [
            d["DashboardName"]
            for d in aws.client("cloudwatch").list_dashboards()["DashboardEntries"]
        ],
        "functions": [
            f["FunctionName"] for f in aws.client("lambda").list_functions()["Functions"]
        ],
        "log groups": [
            g["logGroupName"] for g in aws.client("logs").describe_log_groups()["logGroups"]
        ],
        "rules": [r["Name"] for r in aws.client("events").list_rules()["Rules"]],
        "role aliases": iot.list_role_aliases()["roleAliases"],
        "iot policies": [p["policyName"] for p in iot.list_policies()["policies"]],
        "thing groups": [g["groupName"] for g in iot.list_thing_groups()["thingGroups"]],
        # A key scheduled for deletion is gone for every purpose but its waiting period.
        "kms keys": _usable_keys(aws, set(physical)),
    }
    lowered = stack_name.lower()
    return {kind: [n for n in names if lowered in n.lower()] for kind, names in found.items()}


def _usable_keys(aws: Any, ids: set[str]) -> list[str]:
    """Descriptions of the KMS keys among ``ids`` not pending deletion (ours name the stack)."""
    kms = aws.client("kms")
    found = []
    for listed in kms.list_keys()["Keys"]:
        if listed["KeyId"] not in ids and listed["KeyArn"] not in ids:
            continue
        key = kms.describe_key(KeyId=listed["KeyId"])["KeyMetadata"]
        if key["KeyState"] != "PendingDeletion":
            found.append(str(key.get("Description", "")))
    return found
