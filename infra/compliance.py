"""Acknowledging a scanner's finding where it lives, with its reason.

cdk-nag findings are acknowledged through CDK's ``Validations`` (cdk-nag v3), checkov
findings through ``Metadata.checkov.skip`` and cfn-lint rules through
``Metadata.cfn-lint.config.ignore_checks`` on the CloudFormation resource. Each takes one
specific rule on one resource, with its reason; there is no blanket switch.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, CfnResource, Validations
from constructs import IConstruct


def acknowledge_nag(scope: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding (e.g. ``AwsSolutions-IAM5[Resource::...]``) on scope."""
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))


def skip_checkov(scope: IConstruct, check_id: str, reason: str) -> None:
    """Record a justified checkov skip in the CloudFormation metadata of scope's resource."""
    resource = cfn_resource(scope)
    metadata = resource.get_metadata("checkov") or {}
    skips = [s for s in metadata.get("skip", []) if s["id"] != check_id]
    skips.append({"id": check_id, "comment": reason})
    resource.add_metadata("checkov", {"skip": skips})


def ignore_cfn_lint(scope: IConstruct, rule: str) -> None:
    """Ignore one cfn-lint rule on scope's resource (the reason belongs in the caller)."""
    resource = cfn_resource(scope)
    metadata = resource.get_metadata("cfn-lint") or {"config": {"ignore_checks": []}}
    ignored = metadata["config"]["ignore_checks"]
    if rule not in ignored:
        ignored.append(rule)
    resource.add_metadata("cfn-lint", metadata)


def cfn_resource(scope: IConstruct) -> CfnResource:
    """The CloudFormation resource a construct stands for (itself, or its default child)."""
    if isinstance(scope, CfnResource):
        return scope
    child = scope.node.default_child
    if not isinstance(child, CfnResource):
        raise TypeError(f"{scope.node.path} has no CloudFormation resource to annotate")
    return child
