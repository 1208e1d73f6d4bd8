"""What ``cdk destroy`` needs to leave nothing of the stack behind.

Two things CloudFormation does not do by itself:

- ``DestroyCleanup``: a delete-time custom resource whose Lambda (``lambdas/cleanup``) detaches
  the stack's IoT policy from the device certificates that hold it and any managed policy
  someone attached to the device role by hand. Its properties name the policy, the role and
  the role's own managed policies, so CloudFormation deletes it, and so runs it, before any of
  those; its function, role and log group go after it.
- ``give_handlers_log_groups``: a log group with a retention, deleted with the stack, for each
  function CDK adds on its own (the S3 auto-delete provider, the bucket-notifications
  handler), which would otherwise log into groups Lambda creates and nobody removes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aws_cdk import Aws, CfnResource, Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.compliance import acknowledge_nag, cfn_resource, ignore_cfn_lint, skip_checkov
from infra.config import LAMBDA_PYTHON_VERSION

CLEANUP_DIR = Path("lambdas/cleanup")
RESOURCE_TYPE = "Custom::DestroyCleanup"
# Ample for thousands of certificates at DetachPolicy's rate; the handler stops 30 s early
# and fails with how far it got, and a retried destroy goes on from there.
TIMEOUT = Duration.minutes(10)
# How long CloudFormation waits for an answer: past the function's timeout, so a function
# that died without answering holds the deletion minutes, not the default hour.
SERVICE_TIMEOUT_SECONDS = int(TIMEOUT.to_seconds()) + 120

_LOG_GROUP_ENCRYPTION = (
    "CloudWatch Logs encrypts every log group at rest; these logs hold resource names and "
    "counts from deploy and destroy, nothing that warrants a paid customer-managed key."
)


class DestroyCleanup(Construct):
    """The delete-time custom resource and its function.

    Attributes: ``function``, ``log_group``, ``resource``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        iot_policy: iot.CfnPolicy,
        device_role: iam.IRole,
        owned_role_policies: Sequence[iam.IManagedPolicy],
        retention: logs.RetentionDays,
        source_root: Path,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.log_group = logs.LogGroup(
            self, "Logs", retention=retention, removal_policy=RemovalPolicy.DESTROY
        )
        skip_checkov(self.log_group, "CKV_AWS_158", _LOG_GROUP_ENCRYPTION)
        role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description="Destroy-time clean-up of the device role and the devices' IoT policy.",
        )
        self.log_group.grant_write(role)
        self.function = lambda_.Function(
            self,
            "Function",
            description="At stack deletion: free the IoT policy and the device role.",
            runtime=lambda_.Runtime(f"python{LAMBDA_PYTHON_VERSION}", lambda_.RuntimeFamily.PYTHON),
            architecture=lambda_.Architecture.ARM_64,
            handler="handler.lambda_handler",
            code=lambda_.Code.from_asset(
                str(source_root / CLEANUP_DIR), exclude=["__pycache__", "*.pyc"]
            ),
            role=role,
            log_group=self.log_group,
            memory_size=128,
            timeout=TIMEOUT,
        )
        self._grant(role, stack, iot_policy, device_role, owned_role_policies)
        self._acknowledge(role)

        owned = [p.managed_policy_arn for p in owned_role_policies]
        # Refs, not names: each is a dependency, so CloudFormation deletes this resource (and
        # runs the clean-up) before the IoT policy, the role and the role's own policies.
        self.resource = CfnResource(
            self,
            "Resource",
            type=RESOURCE_TYPE,
            properties={
                "ServiceToken": self.function.function_arn,
                "ServiceTimeout": SERVICE_TIMEOUT_SECONDS,
                "IotPolicyName": iot_policy.ref,
                "RoleName": device_role.role_name,
                "OwnedPolicyArns": owned,
            },
        )
        self.resource.apply_removal_policy(RemovalPolicy.DESTROY)

    def _grant(
        self,
        role: iam.Role,
        stack: Stack,
        iot_policy: iot.CfnPolicy,
        device_role: iam.IRole,
        owned_role_policies: Sequence[iam.IManagedPolicy],
    ) -> None:
        """Exactly the calls the handler makes, each on the stack's own resource where the
        API authorises one."""
        iot_arn = f"arn:{stack.partition}:iot:{stack.region}:{stack.account}"
        statements = [
            # Is the stack being deleted (not an update's rollback)?
            iam.PolicyStatement(
                actions=["cloudformation:DescribeStacks"], resources=[Aws.STACK_ID]
            ),
            iam.PolicyStatement(
                actions=["iot:ListTargetsForPolicy"], resources=[iot_policy.attr_arn]
            ),
            # DetachPolicy is authorised on the target (a certificate or thing group), not on
            # the policy: the targets are the devices' certificates, unknown at synthesis.
            iam.PolicyStatement(
                actions=["iot:DetachPolicy"],
                resources=[f"{iot_arn}:cert/*", f"{iot_arn}:thinggroup/*"],
            ),
            iam.PolicyStatement(
                actions=["iam:ListAttachedRolePolicies"], resources=[device_role.role_arn]
            ),
            # Never the stack's own policies: CloudFormation detaches those as it deletes them.
            iam.PolicyStatement(
                actions=["iam:DetachRolePolicy"],
                resources=[device_role.role_arn],
                conditions={
                    "ArnNotEquals": {
                        "iam:PolicyARN": [p.managed_policy_arn for p in owned_role_policies]
                    }
                }
                if owned_role_policies
                else None,
            ),
        ]
        for statement in statements:
            role.add_to_principal_policy(statement)

    def _acknowledge(self, role: iam.Role) -> None:
        iot_arn = "arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>"
        for kind in ("cert", "thinggroup"):
            acknowledge_nag(
                role.node.find_child("DefaultPolicy"),
                f"AwsSolutions-IAM5[Resource::{iot_arn}:{kind}/*]",
                "iot:DetachPolicy is authorised on the target that holds the policy, and the "
                "targets are the devices' certificates (or thing groups), created after "
                "deployment by the installer; only this account and region, only at deletion.",
            )
        function = cfn_resource(self.function)
        # CDK renders a DependsOn on the execution role beside the GetAtt of its ARN (W3005).
        ignore_cfn_lint(function, "W3005")
        for check_id, reason in _FUNCTION_CHECKOV_SKIPS.items():
            skip_checkov(function, check_id, reason)


_FUNCTION_CHECKOV_SKIPS = {
    "CKV_AWS_115": "Invoked by CloudFormation alone, once per stack deletion (and not at all "
    "otherwise); there is no concurrency to limit.",
    "CKV_AWS_116": "Invoked synchronously by CloudFormation, which records a failure in the "
    "stack's events; there is no asynchronous event to keep.",
    "CKV_AWS_117": "Calls only the public IoT, IAM and CloudFormation APIs and CloudFormation's "
    "response URL; a VPC would need NAT or endpoints that cost money while idle.",
}


def give_handlers_log_groups(
    scope: Construct, retention: logs.RetentionDays
) -> list[logs.LogGroup]:
    """A log group with ``retention``, deleted with the stack, for every function in the stack
    that has none (CDK's own handlers); each function's LoggingConfig names its group."""
    stack = Stack.of(scope)
    created = []
    for node in stack.node.find_all():
        if not (
            isinstance(node, CfnResource) and node.cfn_resource_type == "AWS::Lambda::Function"
        ):
            continue
        if _has_log_group(stack, node):
            continue
        name = "".join(part for part in node.node.path.split("/")[1:] if part != "Resource")
        log_group = logs.LogGroup(
            scope, f"{name}Logs", retention=retention, removal_policy=RemovalPolicy.DESTROY
        )
        skip_checkov(log_group, "CKV_AWS_158", _LOG_GROUP_ENCRYPTION)
        node.add_property_override("LoggingConfig.LogGroup", log_group.log_group_name)
        created.append(log_group)
    return created


def _has_log_group(stack: Stack, function: CfnResource) -> bool:
    # A CfnFunction holds its properties camel-cased, a plain CfnResource as CloudFormation's.
    properties = stack.resolve(function._cfn_properties)
    config = next((v for k, v in properties.items() if k.lower() == "loggingconfig"), None)
    return isinstance(config, dict) and any(k.lower() == "loggroup" for k in config)
