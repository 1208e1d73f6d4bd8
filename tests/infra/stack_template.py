"""Reading the synthesized stack: where the repository is, its cdk.json context, and
small helpers that spell CloudFormation the way the CDK renders it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The CDK's JavaScript half: no version-check network call, no Node end-of-life banner.
os.environ.setdefault("CDK_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from aws_cdk import App, Stack, assertions
from constructs import IConstruct

from infra.compliance import cfn_resource
from infra.stack import FederationStack, build_app

REPO_ROOT = Path(__file__).resolve().parents[2]


def cdk_context() -> dict[str, Any]:
    """The context block of cdk.json: federation and infra config plus feature flags."""
    context: dict[str, Any] = json.loads((REPO_ROOT / "cdk.json").read_text())["context"]
    return context


@dataclass(frozen=True)
class Synthesized:
    stack: FederationStack
    template: assertions.Template
    template_json: dict[str, Any]
    template_path: Path
    assembly_dir: Path

    def resources(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return {
            logical_id: resource
            for logical_id, resource in self.template_json["Resources"].items()
            if resource["Type"] == resource_type
        }

    def logical_id(self, construct: IConstruct) -> str:
        return logical_id(construct)


def synthesize(
    outdir: Path, context: Mapping[str, Any] | None = None, *, app_root: Path | None = None
) -> tuple[FederationStack, Path]:
    """Build and synthesize the app; returns the stack and the cloud assembly's directory.
    ``app_root``: a user's app folder (default: this repository, the reference app)."""
    app = App(context=dict(cdk_context() if context is None else context), outdir=str(outdir))
    stack = build_app(app, source_root=REPO_ROOT, app_root=app_root)
    assembly = app.synth()
    return stack, Path(assembly.directory)


def synthesized_stack(
    outdir: Path, context: Mapping[str, Any] | None = None, *, app_root: Path | None = None
) -> Synthesized:
    """The app synthesized, with its template read as the tests read it."""
    stack, assembly_dir = synthesize(outdir, context, app_root=app_root)
    template_path = assembly_dir / stack.template_file
    template_json = json.loads(template_path.read_text())
    return Synthesized(
        stack=stack,
        template=assertions.Template.from_json(template_json),
        template_json=template_json,
        template_path=template_path,
        assembly_dir=assembly_dir,
    )


def statements_of(template_json: Mapping[str, Any], policy_logical_id: str) -> list[dict[str, Any]]:
    policy = template_json["Resources"][policy_logical_id]["Properties"]["PolicyDocument"]
    return list(policy["Statement"])


def actions_of(statement: Mapping[str, Any]) -> list[str]:
    actions = statement["Action"]
    return sorted([actions] if isinstance(actions, str) else actions)


def resources_of(statement: Mapping[str, Any]) -> list[Any]:
    resources = statement["Resource"]
    return resources if isinstance(resources, list) else [resources]


def object_arn(bucket_logical_id: str, key_pattern: str) -> dict[str, Any]:
    """How CloudFormation spells ``<bucket ARN>/<key pattern>`` in a synthesized policy."""
    return {"Fn::Join": ["", [{"Fn::GetAtt": [bucket_logical_id, "Arn"]}, f"/{key_pattern}"]]}


def arn_of(logical_id: str) -> dict[str, Any]:
    return {"Fn::GetAtt": [logical_id, "Arn"]}


def logical_id(construct: IConstruct) -> str:
    """The logical ID CloudFormation knows a construct's resource by."""
    stack = Stack.of(construct)
    return str(stack.resolve(stack.get_logical_id(cfn_resource(construct))))


def resource_json(template_json: Mapping[str, Any], construct: IConstruct) -> dict[str, Any]:
    """A construct's resource (Type, Properties, ...) in a synthesized template."""
    resource: dict[str, Any] = template_json["Resources"][logical_id(construct)]
    return resource


def bare_app_stack(name: str = "ConstructUnderTest") -> Stack:
    """An empty stack in its own app (with cdk.json's context), to build one construct in."""
    return Stack(App(context=cdk_context()), name)


def render(value: Any) -> str:
    """A CloudFormation string value as text, each intrinsic shown as ``<Kind:arg>``.

    ``{"Fn::Join": ["", ["s3://", {"Ref": "B"}, "/k"]]}`` renders as ``s3://<Ref:B>/k``;
    placeholders hold no quotes, so rendered JSON stays parseable.
    """
    if isinstance(value, str):
        return value
    ((kind, arg),) = value.items()
    if kind == "Fn::Join":
        return str(arg[0]).join(render(part) for part in arg[1])
    if kind == "Fn::GetAtt":
        return f"<GetAtt:{arg[0]}.{arg[1]}>"
    return f"<{kind.removeprefix('Fn::')}:{arg}>"
