"""Acknowledging a scanner's finding where it lives, with its reason.

cdk-nag findings are acknowledged through CDK's ``Validations`` (cdk-nag v3), checkov
findings through ``Metadata.checkov.skip`` on the CloudFormation resource. Both take one
specific rule and one specific reason; there is no blanket switch.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, CfnResource, Validations
from constructs import IConstruct


def acknowledge_nag(scope: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding (e.g. ``AwsSolutions-IAM5[Resource::...]``) on scope."""
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))


def skip_checkov(scope: IConstruct, check_id: str, reason: str) -> None:
    """Record a justified checkov skip in the CloudFormation metadata of scope's resource."""
    resource = _cfn_resource(scope)
    metadata = resource.get_metadata("checkov") or {}
    skips = [s for s in metadata.get("skip", []) if s["id"] != check_id]
    skips.append({"id": check_id, "comment": reason})
    resource.add_metadata("checkov", {"skip": skips})


def _cfn_resource(scope: IConstruct) -> CfnResource:
    if isinstance(scope, CfnResource):
        return scope
    child = scope.node.default_child
    if not isinstance(child, CfnResource):
        raise TypeError(f"{scope.node.path} has no CloudFormation resource to annotate")
    return child
