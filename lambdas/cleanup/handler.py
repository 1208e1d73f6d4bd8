"""Destroy clean-up Lambda: frees the stack's IoT policy and device role so that CloudFormation
can delete them when the stack is destroyed.

The function behind the stack's ``Custom::DestroyCleanup`` resource (``infra.cleanup``), which
CloudFormation calls directly and which answers on the request's pre-signed ``ResponseURL``.
Zip-packaged from this folder alone: boto3 and botocore from the Lambda runtime, nothing else.

On ``Delete`` only, and only while the stack itself is being deleted (``DELETE_IN_PROGRESS``;
not in an update's rollback or clean-up, which also send ``Delete``), it:

- detaches the stack's IoT policy from every target that holds it (device certificates, thing
  groups; ``ListTargetsForPolicy``, every page), since CloudFormation cannot delete an IoT
  policy that is attached;
- detaches from the device role every managed policy the stack did not attach (for example
  one attached for Greengrass's log manager): CloudFormation cannot delete a role that still
  has one. Detaching rather than refusing: the policy itself stays in the account untouched,
  and what goes is only its attachment to a role that is being deleted anyway, so nothing
  anyone wrote is lost. Inline policies written into the role by hand are not touched (their
  document exists nowhere else); CloudFormation names the role if one blocks it.

Not the fleet deployment: CloudFormation's own delete of ``AWS::GreengrassV2::Deployment``
cancels it and deletes it (its resource schema's delete handler holds
``greengrass:CancelDeployment`` and ``iot:CancelJob``, and ``DeleteDeployment`` refuses an
active deployment). Neither that nor anything here uninstalls the component from devices
that already have it.

A retried stack deletion runs it again; each step is idempotent. When the function's time
runs short it fails with how far it got, and the next ``cdk destroy`` goes on from there.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

#: The resource's one physical id: it never changes, so CloudFormation never replaces the
#: resource (a replacement would send ``Delete`` for the old one during an update).
PHYSICAL_ID = "destroy-cleanup"
#: The stack status in which ``Delete`` means the stack is going away.
STACK_BEING_DELETED = "DELETE_IN_PROGRESS"
#: Stop this long before the function's timeout, to answer CloudFormation in time.
SAFETY_MARGIN_MS = 30_000
# DetachPolicy is throttled per account; botocore's standard mode backs off and retries.
_RETRIES = Config(retries={"mode": "standard", "max_attempts": 10})


class CleanupIncomplete(RuntimeError):
    """The function ran short of time; a retried deletion continues."""


@dataclass(frozen=True)
class CleanupTargets:
    """What the resource's properties name: the stack's IoT policy, its device role, and the
    managed policies the stack itself attaches to that role (left for CloudFormation)."""

    iot_policy_name: str
    role_name: str
    owned_policy_arns: frozenset[str]

    @classmethod
    def from_properties(cls, properties: dict[str, Any]) -> CleanupTargets:
        return cls(
            iot_policy_name=str(properties["IotPolicyName"]),
            role_name=str(properties["RoleName"]),
            owned_policy_arns=frozenset(str(a) for a in properties.get("OwnedPolicyArns", [])),
        )


@dataclass
class CleanupOutcome:
    detached_targets: list[str] = field(default_factory=list)
    detached_role_policies: list[str] = field(default_factory=list)


def clean_up(
    targets: CleanupTargets,
    *,
    iot: Any,
    iam: Any,
    time_left_ms: Callable[[], int] = lambda: 1 << 62,
) -> CleanupOutcome:
    """Detach the IoT policy from every target and the foreign managed policies from the role."""
    outcome = CleanupOutcome()
    policy_targets = list(_policy_targets(iot, targets.iot_policy_name))
    for target in policy_targets:
        _check_time(time_left_ms, outcome, len(policy_targets))
        try:
            iot.detach_policy(policyName=targets.iot_policy_name, target=target)
        except ClientError as e:
            if _code(e) != "ResourceNotFoundException":  # gone meanwhile: nothing to detach
                raise
        outcome.detached_targets.append(target)
    for arn in _foreign_role_policies(iam, targets):
        _check_time(time_left_ms, outcome, len(policy_targets))
        try:
            iam.detach_role_policy(RoleName=targets.role_name, PolicyArn=arn)
        except ClientError as e:
            if _code(e) != "NoSuchEntity":
                raise
        outcome.detached_role_policies.append(arn)
    return outcome


def _policy_targets(iot: Any, policy_name: str) -> Iterable[str]:
    """Every target of the policy, all pages listed before anything is detached (detaching
    while paging would shift the listing under its marker)."""
    found: list[str] = []
    try:
        for page in iot.get_paginator("list_targets_for_policy").paginate(
            policyName=policy_name, PaginationConfig={"PageSize": 250}
        ):
            found.extend(page.get("targets", []))
    except ClientError as e:
        if _code(e) != "ResourceNotFoundException":  # the policy is gone already
            raise
    return found


def _foreign_role_policies(iam: Any, targets: CleanupTargets) -> list[str]:
    found: list[str] = []
    try:
        for page in iam.get_paginator("list_attached_role_policies").paginate(
            RoleName=targets.role_name
        ):
            found.extend(p["PolicyArn"] for p in page["AttachedPolicies"])
    except ClientError as e:
        if _code(e) != "NoSuchEntity":  # the role is gone already
            raise
    return [arn for arn in found if arn not in targets.owned_policy_arns]


def _check_time(time_left_ms: Callable[[], int], outcome: CleanupOutcome, total: int) -> None:
    if time_left_ms() < SAFETY_MARGIN_MS:
        raise CleanupIncomplete(
            f"ran short of time after detaching the IoT policy from "
            f"{len(outcome.detached_targets)} of {total} targets and "
            f"{len(outcome.detached_role_policies)} foreign policies from the device role; "
            "delete the stack again to continue"
        )


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


# --- the custom resource ---------------------------------------------------------------------


def handle(
    event: dict[str, Any],
    *,
    iot: Any,
    iam: Any,
    stack_status: Callable[[str], str],
    time_left_ms: Callable[[], int] = lambda: 1 << 62,
) -> CleanupOutcome | None:
    """Run the clean-up for a stack deletion's ``Delete`` request; ``None`` for any other."""
    if event["RequestType"] != "Delete":
        return None
    status = stack_status(event["StackId"])
    if status != STACK_BEING_DELETED:
        logger.info("Delete while the stack is %s, not being deleted: nothing to do", status)
        return None
    targets = CleanupTargets.from_properties(event["ResourceProperties"])
    return clean_up(targets, iot=iot, iam=iam, time_left_ms=time_left_ms)


def stack_status_reader(cloudformation: Any) -> Callable[[str], str]:
    def status(stack_id: str) -> str:
        (stack,) = cloudformation.describe_stacks(StackName=stack_id)["Stacks"]
        return str(stack["StackStatus"])

    return status


def respond(event: dict[str, Any], status: str, reason: str = "") -> None:
    """Answer CloudFormation on the request's pre-signed URL (a PUT with no content type)."""
    body = json.dumps(
        {
            "Status": status,
            "Reason": reason[:2000] or status,
            "PhysicalResourceId": event.get("PhysicalResourceId", PHYSICAL_ID),
            "StackId": event["StackId"],
            "RequestId": event["RequestId"],
            "LogicalResourceId": event["LogicalResourceId"],
        }
    ).encode()
    url = str(event["ResponseURL"])
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"not an HTTP response URL: {url[:60]}")
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        url, data=body, method="PUT", headers={"Content-Type": "", "Content-Length": str(len(body))}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        logger.info("CloudFormation answered %s", response.status)


def lambda_handler(event: dict[str, Any], context: Any) -> None:
    try:
        outcome = handle(
            event,
            iot=boto3.client("iot", config=_RETRIES),
            iam=boto3.client("iam", config=_RETRIES),
            stack_status=stack_status_reader(boto3.client("cloudformation", config=_RETRIES)),
            time_left_ms=context.get_remaining_time_in_millis,
        )
    except Exception as e:
        logger.exception("clean-up failed")
        respond(event, "FAILED", f"{type(e).__name__}: {e}")
        return
    if outcome is not None:
        logger.info(
            "detached the IoT policy from %d targets and %d foreign policies from the role: %s",
            len(outcome.detached_targets),
            len(outcome.detached_role_policies),
            outcome.detached_role_policies,
        )
    respond(event, "SUCCESS")
