"""cdk destroy completes after devices were installed: the destroy clean-up's handler frees the
IoT policy and the device role (run against the local emulator's IoT and IAM), the template
orders it before CloudFormation deletes them and grants it exactly its calls, and every
function the stack makes logs to a group that has a retention and goes with the stack."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import custom_resources
import pytest
from local_stack import cleanup_handler, deletion_waves
from stack_template import Synthesized, arn_of, logical_id

from infra.edge import template_references
from sfl.local.emulator import LocalAws

handler = cleanup_handler()

OTHER_STACK_STATES = [
    "UPDATE_ROLLBACK_IN_PROGRESS",  # an update that added the resource is rolled back
    "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS",  # a later version removed it from the template
    "ROLLBACK_IN_PROGRESS",
]

# --- the handler, against the emulator's IoT and IAM -----------------------------------------


@dataclass
class Fleet:
    """A stack's IoT policy held by installed devices, and its device role holding the stack's
    policy plus ones attached by hand."""

    aws: LocalAws
    iot_policy: str
    unrelated_iot_policy: str
    certificates: list[str]
    thing_group_arn: str
    role: str
    owned_policy: str
    foreign_policies: list[str]

    def properties(self) -> dict[str, Any]:
        """What the template's resource passes (CloudFormation sends strings)."""
        return {
            "ServiceToken": "arn:aws:lambda:us-east-1:123456789012:function:cleanup",
            "ServiceTimeout": "720",
            "IotPolicyName": self.iot_policy,
            "RoleName": self.role,
            "OwnedPolicyArns": [self.owned_policy],
        }

    def event(self, request_type: str, **extra: Any) -> dict[str, Any]:
        event = {
            "RequestType": request_type,
            "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/Sfl-Federation/1",
            "RequestId": str(uuid.uuid4()),
            "LogicalResourceId": "DestroyCleanup143505EE",
            "ResourceType": "Custom::DestroyCleanup",
            "ResponseURL": "http://127.0.0.1:9/unused",
            "ResourceProperties": self.properties(),
            **extra,
        }
        if request_type != "Create":
            event.setdefault("PhysicalResourceId", handler.PHYSICAL_ID)
        return event

    def targets(self) -> list[str]:
        iot = self.aws.client("iot")
        return list(iot.list_targets_for_policy(policyName=self.iot_policy)["targets"])

    def role_policies(self) -> list[str]:
        iam = self.aws.client("iam")
        attached = iam.list_attached_role_policies(RoleName=self.role)["AttachedPolicies"]
        return sorted(p["PolicyArn"] for p in attached)

    def handle(self, event: dict[str, Any], stack_status: str = handler.STACK_BEING_DELETED) -> Any:
        return handler.handle(
            event,
            iot=self.aws.client("iot"),
            iam=self.aws.client("iam"),
            stack_status=lambda _stack_id: stack_status,
        )


def _policy_document(action: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}],
        }
    )


@pytest.fixture
def fleet(local_aws: LocalAws) -> Iterator[Fleet]:
    suffix = uuid.uuid4().hex[:8]
    iot = local_aws.client("iot")
    iam = local_aws.client("iam")
    iot_policy = f"GreengrassTESCertificatePolicySfl-{suffix}"
    unrelated = f"SomeoneElses-{suffix}"
    iot.create_policy(policyName=iot_policy, policyDocument=_policy_document("iot:Connect"))
    iot.create_policy(policyName=unrelated, policyDocument=_policy_document("iot:Connect"))
    certificates = []
    for _ in range(3):
        certificate = iot.create_keys_and_certificate(setAsActive=True)["certificateArn"]
        iot.attach_policy(policyName=iot_policy, target=certificate)
        certificates.append(certificate)
    iot.attach_policy(policyName=unrelated, target=certificates[0])
    group = iot.create_thing_group(thingGroupName=f"Sfl-{suffix}-Devices")["thingGroupArn"]
    iot.attach_policy(policyName=iot_policy, target=group)

    role = f"Sfl-{suffix}-TokenExchangeRole"
    iam.create_role(
        RoleName=role,
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "credentials.iot.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )
    owned = iam.create_policy(
        PolicyName=f"{role}Access", PolicyDocument=_policy_document("s3:GetBucketLocation")
    )["Policy"]["Arn"]
    by_hand = iam.create_policy(
        PolicyName=f"LogManager-{suffix}", PolicyDocument=_policy_document("logs:PutLogEvents")
    )["Policy"]["Arn"]
    # (moto holds no AWS managed policies: a second one of the account's, under a path.)
    other = iam.create_policy(
        PolicyName=f"Diagnostics-{suffix}",
        Path="/operators/",
        PolicyDocument=_policy_document("greengrass:ListCoreDevices"),
    )["Policy"]["Arn"]
    for arn in (owned, by_hand, other):
        iam.attach_role_policy(RoleName=role, PolicyArn=arn)
    yield Fleet(
        local_aws,
        iot_policy,
        unrelated,
        certificates,
        group,
        role,
        owned,
        sorted([by_hand, other]),
    )
    # The thing group's attachment goes whatever the test did: while any thing group holds a
    # policy, moto answers every DeleteCertificate on the shared server with a 500 (it looks
    # for a certificate id on the group), which AWS does not.
    for policy in (iot_policy, unrelated):
        if policy in {p["policyName"] for p in iot.list_policies()["policies"]}:
            for target in iot.list_targets_for_policy(policyName=policy)["targets"]:
                iot.detach_policy(policyName=policy, target=target)
    iot.delete_thing_group(thingGroupName=f"Sfl-{suffix}-Devices")


def test_stack_deletion_frees_the_iot_policy_and_the_role(fleet: Fleet):
    outcome = fleet.handle(fleet.event("Delete"))

    assert fleet.targets() == []
    assert sorted(outcome.detached_targets) == sorted([*fleet.certificates, fleet.thing_group_arn])
    # Only the stack's own policy is left on the role, for CloudFormation to detach and delete.
    assert fleet.role_policies() == [fleet.owned_policy]
    assert sorted(outcome.detached_role_policies) == fleet.foreign_policies
    # Detached, not deleted: policies made by hand stay in the account, and another IoT policy
    # on a device's certificate stays attached.
    iam = fleet.aws.client("iam")
    for arn in fleet.foreign_policies:
        assert iam.get_policy(PolicyArn=arn)["Policy"]["Arn"] == arn
    held = fleet.aws.client("iot").list_attached_policies(target=fleet.certificates[0])
    assert [p["policyName"] for p in held["policies"]] == [fleet.unrelated_iot_policy]


@pytest.mark.parametrize("request_type", ["Create", "Update"])
def test_create_and_update_change_nothing(fleet: Fleet, request_type: str):
    def no_status_read(_stack_id: str) -> str:
        raise AssertionError("Create and Update must not even look at the stack")

    extra = {"OldResourceProperties": fleet.properties()} if request_type == "Update" else {}
    outcome = handler.handle(
        fleet.event(request_type, **extra),
        iot=fleet.aws.client("iot"),
        iam=fleet.aws.client("iam"),
        stack_status=no_status_read,
    )

    assert outcome is None
    assert len(fleet.targets()) == 4
    assert fleet.role_policies() == sorted([fleet.owned_policy, *fleet.foreign_policies])


@pytest.mark.parametrize("status", OTHER_STACK_STATES)
def test_a_delete_while_the_stack_stays_changes_nothing(fleet: Fleet, status: str):
    """CloudFormation sends Delete in an update's rollback and clean-up too: the devices must
    keep their policy then."""
    assert fleet.handle(fleet.event("Delete"), stack_status=status) is None
    assert len(fleet.targets()) == 4
    assert fleet.role_policies() == sorted([fleet.owned_policy, *fleet.foreign_policies])


@pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")  # moto: no model, no matter
def test_the_stack_status_is_read_from_cloudformation(local_aws: LocalAws):
    cloudformation = local_aws.client("cloudformation")
    name = f"Sfl-Status-{uuid.uuid4().hex[:8]}"
    template = {"Resources": {"Handle": {"Type": "AWS::CloudFormation::WaitConditionHandle"}}}
    stack_id = cloudformation.create_stack(StackName=name, TemplateBody=json.dumps(template))[
        "StackId"
    ]
    try:
        assert handler.stack_status_reader(cloudformation)(stack_id) == "CREATE_COMPLETE"
    finally:
        cloudformation.delete_stack(StackName=stack_id)


def test_a_retried_deletion_finds_nothing_left_and_succeeds(fleet: Fleet):
    fleet.handle(fleet.event("Delete"))
    again = fleet.handle(fleet.event("Delete"))
    assert (again.detached_targets, again.detached_role_policies) == ([], [])

    # CloudFormation already deleted the policy and the role in an earlier attempt.
    fleet.aws.client("iot").delete_policy(policyName=fleet.iot_policy)
    iam = fleet.aws.client("iam")
    iam.detach_role_policy(RoleName=fleet.role, PolicyArn=fleet.owned_policy)
    iam.delete_role(RoleName=fleet.role)
    gone = fleet.handle(fleet.event("Delete"))
    assert (gone.detached_targets, gone.detached_role_policies) == ([], [])


def test_short_of_time_it_fails_with_how_far_it_got_and_a_retry_finishes(fleet: Fleet):
    budget = iter([60_000, 60_000, 1_000])

    with pytest.raises(handler.CleanupIncomplete, match="2 of 4 targets"):
        handler.clean_up(
            handler.CleanupTargets.from_properties(fleet.properties()),
            iot=fleet.aws.client("iot"),
            iam=fleet.aws.client("iam"),
            time_left_ms=lambda: next(budget),
        )
    assert len(fleet.targets()) == 2

    fleet.handle(fleet.event("Delete"))
    assert fleet.targets() == []


# --- the Lambda entry point answers CloudFormation -------------------------------------------


@pytest.fixture
def response_url() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in for the pre-signed S3 URL CloudFormation waits on; keeps each answer."""
    with custom_resources.response_url() as served:
        yield served


class Context:
    def get_remaining_time_in_millis(self) -> int:
        return 600_000


@pytest.fixture
def lambda_environment(local_aws: LocalAws, monkeypatch: pytest.MonkeyPatch) -> None:
    """The function's environment, pointed at the emulator (boto3's default session fresh)."""
    import boto3

    for key, value in local_aws.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


@pytest.mark.usefixtures("lambda_environment")
def test_the_function_answers_success_with_its_one_physical_id(
    fleet: Fleet, response_url: tuple[str, list[dict[str, Any]]]
):
    url, answers = response_url
    event = fleet.event("Create", ResponseURL=url)
    handler.lambda_handler(event, Context())

    (answer,) = answers
    assert answer["Status"] == "SUCCESS"
    assert answer["PhysicalResourceId"] == handler.PHYSICAL_ID
    assert (answer["RequestId"], answer["LogicalResourceId"], answer["StackId"]) == (
        event["RequestId"],
        event["LogicalResourceId"],
        event["StackId"],
    )


@pytest.mark.usefixtures("lambda_environment")
def test_a_failure_is_answered_with_its_reason_instead_of_leaving_the_stack_waiting(
    fleet: Fleet, response_url: tuple[str, list[dict[str, Any]]]
):
    url, answers = response_url
    # The emulator's CloudFormation has no such stack: reading its status fails.
    handler.lambda_handler(fleet.event("Delete", ResponseURL=url), Context())

    (answer,) = answers
    assert answer["Status"] == "FAILED"
    assert "does not exist" in answer["Reason"]
    assert answer["PhysicalResourceId"] == handler.PHYSICAL_ID
    assert len(fleet.targets()) == 4  # nothing was detached


# --- the template ----------------------------------------------------------------------------


def _needs(template: dict[str, Any], logical: str) -> set[str]:
    """Everything a resource depends on, transitively (Ref, GetAtt, DependsOn): CloudFormation
    deletes a resource before everything it needs."""
    resources = template["Resources"]
    found: set[str] = set()
    stack = [logical]
    while stack:
        resource = resources[stack.pop()]
        depends = resource.get("DependsOn", [])
        direct = set([depends] if isinstance(depends, str) else depends)
        direct |= {r for r in template_references(resource.get("Properties", {})) if r in resources}
        stack.extend(direct - found)
        found |= direct
    return found


def test_the_clean_up_names_the_stack_s_policy_role_and_own_policies(synthesized: Synthesized):
    edge = synthesized.stack.edge
    cleanup = synthesized.stack.cleanup
    synthesized.template.has_resource(
        "Custom::DestroyCleanup",
        {
            "Properties": {
                "ServiceToken": arn_of(logical_id(cleanup.function)),
                "IotPolicyName": {"Ref": logical_id(edge.device_iot_policy)},
                "RoleName": {"Ref": logical_id(edge.device_role)},
                "OwnedPolicyArns": [{"Ref": logical_id(edge.nucleus_policy)}],
            },
            "DeletionPolicy": "Delete",
        },
    )


def test_the_clean_up_runs_before_the_policy_and_role_go_and_its_function_after(
    synthesized: Synthesized,
):
    stack = synthesized.stack
    template = synthesized.template_json
    (cleanup,) = synthesized.resources("Custom::DestroyCleanup")
    needs = _needs(template, cleanup)
    edge = stack.edge
    for freed in (edge.device_iot_policy, edge.device_role, edge.nucleus_policy):
        assert logical_id(freed) in needs  # still there while the clean-up runs
    function = stack.cleanup.function
    role = function.role
    assert role is not None
    for own in (function, role, role.node.find_child("DefaultPolicy"), stack.cleanup.log_group):
        assert logical_id(own) in needs  # the clean-up's own parts outlive it
    # Nothing else waits for it: it goes first.
    assert not any(cleanup in _needs(template, lg) for lg in template["Resources"] if lg != cleanup)


def test_cdk_destroy_s_order_reaches_the_clean_up_before_the_policy_and_the_role(
    synthesized: Synthesized,
):
    """The order the deploy rehearsal's destroy follows, from the template's dependency graph
    alone: the clean-up in the first wave, the IoT policy, the device role and the stack's own
    policy on it in later ones, the clean-up's function after it; every custom resource goes
    before what it names (CDK's auto-delete before its bucket)."""
    resources = synthesized.template_json["Resources"]
    waves = deletion_waves(resources, set(resources))
    wave_of = {logical: n for n, wave in enumerate(waves) for logical in wave}
    stack = synthesized.stack
    cleanup = logical_id(stack.cleanup.resource)
    assert wave_of[cleanup] == 0
    edge = stack.edge
    for freed in (edge.device_iot_policy, edge.device_role, edge.nucleus_policy):
        assert wave_of[logical_id(freed)] > wave_of[cleanup]
    assert wave_of[logical_id(stack.cleanup.function)] > wave_of[cleanup]
    for logical, resource in resources.items():
        if resource["Type"].startswith("Custom::"):
            named = set(template_references(resource["Properties"])) & set(resources)
            assert named and all(wave_of[n] > wave_of[logical] for n in named), logical


def test_the_clean_up_may_make_exactly_its_calls_on_the_stack_s_resources(
    synthesized: Synthesized,
):
    edge = synthesized.stack.edge
    role = synthesized.stack.cleanup.function.role
    assert role is not None
    policy = synthesized.template_json["Resources"][
        logical_id(role.node.find_child("DefaultPolicy"))
    ]
    iot_arn = (
        {"Ref": "AWS::Partition"},
        ":iot:",
        {"Ref": "AWS::Region"},
        ":",
        {"Ref": "AWS::AccountId"},
    )

    def in_account(kind: str) -> dict[str, Any]:
        return {"Fn::Join": ["", ["arn:", *iot_arn, f":{kind}/*"]]}

    device_role = arn_of(logical_id(edge.device_role))
    assert policy["Properties"]["PolicyDocument"]["Statement"] == [
        {
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Effect": "Allow",
            "Resource": arn_of(logical_id(synthesized.stack.cleanup.log_group)),
        },
        {
            "Action": "cloudformation:DescribeStacks",
            "Effect": "Allow",
            "Resource": {"Ref": "AWS::StackId"},
        },
        {
            "Action": "iot:ListTargetsForPolicy",
            "Effect": "Allow",
            "Resource": arn_of(logical_id(edge.device_iot_policy)),
        },
        {
            "Action": "iot:DetachPolicy",
            "Effect": "Allow",
            "Resource": [in_account("cert"), in_account("thinggroup")],
        },
        {"Action": "iam:ListAttachedRolePolicies", "Effect": "Allow", "Resource": device_role},
        {
            "Action": "iam:DetachRolePolicy",
            "Condition": {
                "ArnNotEquals": {"iam:PolicyARN": [{"Ref": logical_id(edge.nucleus_policy)}]}
            },
            "Effect": "Allow",
            "Resource": device_role,
        },
    ]


def test_the_clean_up_zip_holds_its_handler_alone(synthesized: Synthesized):
    function = synthesized.template_json["Resources"][
        logical_id(synthesized.stack.cleanup.function)
    ]
    assert function["Properties"]["Handler"] == "handler.lambda_handler"
    key = function["Properties"]["Code"]["S3Key"]
    asset = synthesized.assembly_dir / f"asset.{key.removesuffix('.zip')}"
    assert sorted(p.name for p in asset.iterdir()) == ["handler.py"]


def test_every_function_logs_to_a_group_with_retention_that_goes_with_the_stack(
    synthesized: Synthesized,
):
    groups = synthesized.resources("AWS::Logs::LogGroup")
    functions = synthesized.resources("AWS::Lambda::Function")
    # The two functions, the bootstrap's, the clean-up's and CDK's two handlers.
    assert len(functions) >= 6
    for logical, function in functions.items():
        config = function["Properties"].get("LoggingConfig", {})
        assert set(config.get("LogGroup", {})) == {"Ref"}, logical
        assert config["LogGroup"]["Ref"] in groups, logical
    for logical, group in groups.items():
        assert group["Properties"]["RetentionInDays"] > 0, logical
        assert group["DeletionPolicy"] == "Delete", logical
        assert group["UpdateReplacePolicy"] == "Delete", logical
