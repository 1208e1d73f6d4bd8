"""The AWS calls the Greengrass installer makes with ``--provision true``, in its order.

Played from aws-greengrass-nucleus's ``GreengrassSetup.provision`` and
``DeviceProvisioningHelper`` (createThing, addThingToGroup, setupIoTRoleForTes,
createAndAttachRolePolicy): each resource is looked up first and created only when the
lookup says it does not exist, which is what lets a stack own them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

ROLE_POLICY_SUFFIX = "Access"
CERTIFICATE_POLICY_PREFIX = "GreengrassTESCertificatePolicy"
DEFAULT_THING_POLICY = "GreengrassV2IoTThingPolicy"
# The policy the installer writes when '<role>Access' is missing (logs and
# GetBucketLocation on every resource).
INSTALLER_ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "logs:CreateLogGroup",
                "logs:CreateLogStream",
                "logs:PutLogEvents",
                "logs:DescribeLogStreams",
                "s3:GetBucketLocation",
            ],
            "Resource": "*",
        }
    ],
}


@dataclass
class Provisioned:
    thing_name: str
    certificate_arn: str
    certificate_id: str
    created: list[str] = field(default_factory=list)  # what the installer had to create


def _missing(error: ClientError, *codes: str) -> bool:
    return error.response.get("Error", {}).get("Code") in codes


class GreengrassInstaller:
    """``java -jar Greengrass.jar --provision true ...`` with the operator's credentials."""

    def __init__(self, aws: Any) -> None:
        self.iot = aws.client("iot")
        self.iam = aws.client("iam")
        self.sts = aws.client("sts")

    def provision(
        self,
        *,
        thing_name: str,
        thing_group_name: str,
        thing_policy_name: str,
        tes_role_name: str,
        tes_role_alias_name: str,
    ) -> Provisioned:
        if ":" in thing_name or ":" in thing_group_name:
            raise ValueError("Thing name cannot contain colon characters")
        device = self._create_thing(thing_policy_name, thing_name)
        self._add_thing_to_group(device, thing_group_name)
        self._setup_iot_role_for_tes(device, tes_role_name, tes_role_alias_name)
        self._create_and_attach_role_policy(device, tes_role_name)
        return device

    def _create_thing(self, policy_name: str, thing_name: str) -> Provisioned:
        created = []
        try:
            self.iot.get_policy(policyName=policy_name)
        except ClientError as e:
            if not _missing(e, "ResourceNotFoundException"):
                raise
            self.iot.create_policy(
                policyName=policy_name,
                policyDocument=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": [
                                    "iot:Connect",
                                    "iot:Publish",
                                    "iot:Subscribe",
                                    "iot:Receive",
                                    "greengrass:*",
                                ],
                                "Resource": "*",
                            }
                        ],
                    }
                ),
            )
            created.append(f"iot policy {policy_name}")
        self.iot.describe_endpoint(endpointType="iot:Data-ATS")
        self.iot.describe_endpoint(endpointType="iot:CredentialProvider")
        keys = self.iot.create_keys_and_certificate(setAsActive=True)
        self.iot.attach_policy(policyName=policy_name, target=keys["certificateArn"])
        self.iot.create_thing(thingName=thing_name)
        self.iot.attach_thing_principal(thingName=thing_name, principal=keys["certificateArn"])
        return Provisioned(thing_name, keys["certificateArn"], keys["certificateId"], created)

    def _add_thing_to_group(self, device: Provisioned, group: str) -> None:
        try:
            self.iot.describe_thing_group(thingGroupName=group)
        except ClientError as e:
            if not _missing(e, "ResourceNotFoundException"):
                raise
            self.iot.create_thing_group(thingGroupName=group)
            device.created.append(f"thing group {group}")
        self.iot.add_thing_to_thing_group(thingName=device.thing_name, thingGroupName=group)

    def _setup_iot_role_for_tes(self, device: Provisioned, role: str, alias: str) -> None:
        try:
            alias_arn = self.iot.describe_role_alias(roleAlias=alias)["roleAliasDescription"][
                "roleAliasArn"
            ]
        except ClientError as e:
            if not _missing(e, "ResourceNotFoundException"):
                raise
            try:
                role_arn = self.iam.get_role(RoleName=role)["Role"]["Arn"]
            except ClientError as missing:
                if not _missing(missing, "NoSuchEntity"):
                    raise
                trust = {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "credentials.iot.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
                role_arn = self.iam.create_role(
                    RoleName=role, AssumeRolePolicyDocument=json.dumps(trust)
                )["Role"]["Arn"]
                device.created.append(f"role {role}")
            alias_arn = self.iot.create_role_alias(roleAlias=alias, roleArn=role_arn)[
                "roleAliasArn"
            ]
            device.created.append(f"role alias {alias}")
        policy = CERTIFICATE_POLICY_PREFIX + alias
        try:
            self.iot.get_policy(policyName=policy)
        except ClientError as e:
            if not _missing(e, "ResourceNotFoundException"):
                raise
            document = {
                "Version": "2012-10-17",
                "Statement": {
                    "Effect": "Allow",
                    "Action": "iot:AssumeRoleWithCertificate",
                    "Resource": alias_arn,
                },
            }
            self.iot.create_policy(policyName=policy, policyDocument=json.dumps(document))
            device.created.append(f"iot policy {policy}")
        self.iot.attach_policy(policyName=policy, target=device.certificate_arn)

    def _create_and_attach_role_policy(self, device: Provisioned, role: str) -> None:
        name = role + ROLE_POLICY_SUFFIX
        account = self.sts.get_caller_identity()["Account"]
        # An AWS managed policy of that name first, then the account's own (path '/').
        for arn in (f"arn:aws:iam::aws:policy/{name}", f"arn:aws:iam::{account}:policy/{name}"):
            try:
                self.iam.get_policy(PolicyArn=arn)
                return  # "already exists. Please attach it to the IAM role if not already"
            except ClientError as e:
                if not _missing(e, "NoSuchEntity"):
                    raise
        arn = self.iam.create_policy(
            PolicyName=name, PolicyDocument=json.dumps(INSTALLER_ROLE_POLICY)
        )["Policy"]["Arn"]
        self.iam.attach_role_policy(RoleName=role, PolicyArn=arn)
        device.created.append(f"iam policy {name} (attached to {role})")


def decommission(aws: Any, device: Provisioned) -> None:
    """What an operator does to retire a core device (docs/deploy.md): detach its
    certificate's policies and thing, deactivate and delete the certificate, delete the
    thing."""
    iot = aws.client("iot")
    for policy in iot.list_attached_policies(target=device.certificate_arn)["policies"]:
        iot.detach_policy(policyName=policy["policyName"], target=device.certificate_arn)
    iot.detach_thing_principal(thingName=device.thing_name, principal=device.certificate_arn)
    iot.update_certificate(certificateId=device.certificate_id, newStatus="INACTIVE")
    iot.delete_certificate(certificateId=device.certificate_id)
    iot.delete_thing(thingName=device.thing_name)
