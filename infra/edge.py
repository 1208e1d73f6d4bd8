"""What devices get: credentials, an IoT policy, a thing group, the component and its deployment.

Greengrass core devices never hold access keys: the Token Exchange Service trades the
device's X.509 certificate for short-lived credentials of ``device_role`` through
``role_alias``. The stack grants that role what a device may touch, scoped to the device's
own thing name (``${credentials-iot:ThingName}``). The component's recipe comes from
``sfl.build.recipes`` (the same generator ``sfl recipes`` uses), with the client artifact
(``sfl.build.artifact``) as an S3 asset of the stack, and the stack's own Greengrass deployment
keeps the thing group on the component version this stack registered.

Two resources carry the names the Greengrass installer (``--provision true``) looks up, so
that it reuses them instead of creating its own outside the stack (which ``cdk destroy``
could then not remove): the IAM policy ``<role name>Access`` (DeviceProvisioningHelper
looks for it, and creates and attaches one if it is missing) and the IoT policy
``GreengrassTESCertificatePolicy<role alias>`` (likewise, for the certificate).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from aws_cdk import Aws, CfnResource, Fn, Stack, Stage, Token
from aws_cdk import aws_greengrassv2 as greengrassv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from sfl.build import artifact, recipes
from sfl.build.app_code import DEVICE, NO_APP, AppCode
from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames

# The IAM policy variable AWS IoT's credential provider sets to the calling device's thing.
THING_NAME_VARIABLE = "${credentials-iot:ThingName}"
# The IoT policy variable for the thing whose certificate made the MQTT connection.
IOT_THING_VARIABLE = "${iot:Connection.Thing.ThingName}"
# Names the Greengrass installer derives (DeviceProvisioningHelper): the IAM policy
# '<TES role name>Access' and the IoT policy 'GreengrassTESCertificatePolicy<role alias>'.
INSTALLER_ROLE_POLICY_SUFFIX = "Access"
INSTALLER_CERTIFICATE_POLICY_PREFIX = "GreengrassTESCertificatePolicy"

# Properties whose change makes CloudFormation replace a resource, and so give it a new
# generated name; the component version digest covers them (see _replacement_identity).
_REPLACING_PROPERTIES = {
    "AWS::S3::Bucket": ("bucketName", "objectLockEnabled"),
    "AWS::DynamoDB::Table": (
        "tableName",
        "keySchema",
        "attributeDefinitions",
        "localSecondaryIndexes",
    ),
}


class FederationEdge(Construct):
    """Device credentials (role, role alias, policies), the thing group, the Greengrass
    component, and the deployment of that component to the thing group.

    Attributes: ``device_role``, ``role_alias`` (named ``role_alias_name``), ``nucleus_policy``,
    ``device_iot_policy`` (``device_iot_policy_name``), ``thing_group`` (``thing_group_name``),
    ``client_artifact``, ``component``, ``component_name``,
    ``component_version``, ``recipe``, ``deployment``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        component_name: str,
        notice_topic: str,
        federation: FederationConfig,
        resource_names: ResourceNames,
        source_root: Path,
        app: AppCode = NO_APP,
        device_configuration: Mapping[str, str] | None = None,
        credential_duration_seconds: int = 3_600,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)

        self.device_role = iam.Role(
            self,
            "TokenExchangeRole",
            assumed_by=iam.ServicePrincipal("credentials.iot.amazonaws.com"),
            description="Greengrass token-exchange role of the federation's edge devices.",
        )
        # The IoT names an operator types into the installer are the stack's name plus a
        # suffix: readable, and unique per stack (stack names hold no ':', which IoT refuses).
        self.role_alias_name = Fn.join("-", [Aws.STACK_NAME, "TokenExchangeRoleAlias"])
        self.role_alias = iot.CfnRoleAlias(
            self,
            "TokenExchangeRoleAlias",
            role_alias=self.role_alias_name,
            role_arn=self.device_role.role_arn,
            credential_duration_seconds=credential_duration_seconds,
        )
        # Devices join this group at installation; the stack's deployment targets it.
        self.thing_group_name = Fn.join("-", [Aws.STACK_NAME, "Devices"])
        self.thing_group = iot.CfnThingGroup(
            self,
            "Devices",
            thing_group_name=self.thing_group_name,
            thing_group_properties=iot.CfnThingGroup.ThingGroupPropertiesProperty(
                thing_group_description="Edge clients of the serverless federation"
            ),
        )
        self.notice_topic = notice_topic
        iot_arn = f"arn:{stack.partition}:iot:{stack.region}:{stack.account}"
        self.notice_topic_arn = f"{iot_arn}:topic/{notice_topic}"
        self.device_iot_policy = self._device_iot_policy(stack)

        # The client zip is deterministic: the same sources give the same asset hash. It is
        # written beside the cloud assembly, which stages it as the asset.
        stage = Stage.of(self)
        if stage is None:
            raise ValueError("the edge construct must be inside an App")
        built = artifact.build_client_artifact(
            Path(stage.outdir) / "sfl-edge-client" / artifact.ARCHIVE_NAME,
            source_root=source_root,
            app=app.for_place(DEVICE),
        )
        self.client_artifact = s3_assets.Asset(self, "ClientArtifact", path=str(built.path))
        key = self.client_artifact.s3_object_key
        self.nucleus_policy = self._nucleus_policy(key)

        self.component_name = component_name
        draft = recipes.build_recipe(
            federation,
            resource_names,
            region=stack.region,
            component_name=component_name,
            artifact_uri=f"s3://{self.client_artifact.s3_bucket_name}/{key}",
            artifact_sha256=built.sha256,
            archive_name=None if Token.is_unresolved(key) else key.rsplit("/", 1)[-1],
            component_version="0.0.0",
            notice_topic=notice_topic,
        )
        # Component versions are immutable: a changed recipe or artifact must carry a new
        # version, or CloudFormation's replace-then-delete collides with the one it replaces.
        # The digest is taken over the resolved recipe (logical IDs, not token numbers) and
        # over what would give a referenced bucket or table a new generated name.
        resolved = stack.resolve(draft)
        self.component_version = recipes.recipe_version(
            {**resolved, "ReferencedResources": _replacement_identity(stack, resolved)},
            built.sha256,
        )
        self.recipe = {**draft, "ComponentVersion": self.component_version}
        self.component = greengrassv2.CfnComponentVersion(
            self, "EdgeClientComponent", inline_recipe=stack.to_json_string(self.recipe)
        )
        self.deployment = self._deployment(dict(device_configuration or {}))

    def _nucleus_policy(self, artifact_key: str) -> iam.ManagedPolicy:
        """What the nucleus itself needs to fetch the component's artifact with the device's
        credentials: S3Downloader asks GetBucketLocation first (and gives up on a 403), then
        gets the object. Named as the installer names its policy, so the installer finds it,
        creates none and attaches nothing; the stack attaches it and deletes it on destroy.
        No CloudWatch Logs access: the component runs no log manager."""
        bucket = self.client_artifact.bucket
        return iam.ManagedPolicy(
            self,
            "TokenExchangeRoleAccess",
            managed_policy_name=Fn.join(
                "", [self.device_role.role_name, INSTALLER_ROLE_POLICY_SUFFIX]
            ),
            description="Greengrass nucleus: download the edge client's artifact.",
            statements=[
                iam.PolicyStatement(
                    actions=["s3:GetBucketLocation"], resources=[bucket.bucket_arn]
                ),
                iam.PolicyStatement(
                    actions=["s3:GetObject"], resources=[bucket.arn_for_objects(artifact_key)]
                ),
            ],
            roles=[self.device_role],
        )

    def _notice_statements(self, arn: str) -> list[dict[str, Any]]:
        """Subscribe to the round notice topic and receive from it; never publish to it (a
        device that could would wake the whole fleet). None without push."""
        if not self.notice_topic:
            return []
        return [
            {
                "Effect": "Allow",
                "Action": "iot:Subscribe",
                "Resource": f"{arn}:topicfilter/{self.notice_topic}",
            },
            {"Effect": "Allow", "Action": "iot:Receive", "Resource": self.notice_topic_arn},
        ]

    def _device_iot_policy(self, stack: Stack) -> iot.CfnPolicy:
        """The IoT policy a core device's certificate needs: AWS's minimal Greengrass V2 core
        device policy (MQTT on the thing's own topics, shadows, the deployment and artifact
        APIs) plus iot:AssumeRoleWithCertificate on this stack's role alias only, and the
        round notices: subscribe to and receive on the notice topic, never publish to it (a
        hostile device must not be able to wake the fleet)."""
        arn = f"arn:{stack.partition}:iot:{stack.region}:{stack.account}"
        things = f"$aws/things/{IOT_THING_VARIABLE}"
        document = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    # Exactly its own thing name: AWS's example's trailing '*' (for the extra
                    # '<thing>#2' connections past 50 subscriptions, which this component never
                    # needs) would let 'dev-1' connect as 'dev-10' and drop that device.
                    "Action": "iot:Connect",
                    "Resource": f"{arn}:client/{IOT_THING_VARIABLE}",
                },
                {
                    "Effect": "Allow",
                    "Action": ["iot:Publish", "iot:Receive"],
                    "Resource": [
                        f"{arn}:topic/{things}/greengrass/health/json",
                        f"{arn}:topic/{things}/greengrassv2/health/json",
                        f"{arn}:topic/{things}/jobs/*",
                        f"{arn}:topic/{things}/shadow/*",
                    ],
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:Subscribe",
                    "Resource": [
                        f"{arn}:topicfilter/{things}/jobs/*",
                        f"{arn}:topicfilter/{things}/shadow/*",
                    ],
                },
                *self._notice_statements(arn),
                {
                    "Effect": "Allow",
                    "Action": [
                        "iot:GetThingShadow",
                        "iot:UpdateThingShadow",
                        "iot:DeleteThingShadow",
                    ],
                    "Resource": f"{arn}:thing/{IOT_THING_VARIABLE}",
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:AssumeRoleWithCertificate",
                    "Resource": self.role_alias.attr_role_alias_arn,
                },
                {
                    "Effect": "Allow",
                    # These Greengrass data-plane calls take no resource narrower than '*'.
                    "Action": [
                        "greengrass:GetComponentVersionArtifact",
                        "greengrass:ResolveComponentCandidates",
                        "greengrass:GetDeploymentConfiguration",
                        "greengrass:ListThingGroupsForCoreDevice",
                    ],
                    "Resource": "*",
                },
            ],
        }
        self.device_iot_policy_name = Fn.join(
            "", [INSTALLER_CERTIFICATE_POLICY_PREFIX, self.role_alias_name]
        )
        return iot.CfnPolicy(
            self,
            "CoreDevicePolicy",
            policy_name=self.device_iot_policy_name,
            policy_document=document,
        )

    def _deployment(self, device_configuration: dict[str, str]) -> greengrassv2.CfnDeployment:
        """The thing group's one deployment: this stack's component version.

        A new version replaces the resource (ComponentVersion is a replacement property):
        CloudFormation creates the new component version, then the new deployment revision,
        and only in its clean-up phase deletes the old deployment and then the old version,
        so the live deployment never points at a deleted version. Devices take the update
        one small batch at a time, roll back to what they ran on failure, and the rollout
        stops when too many fail. ``device_configuration`` (device-owned keys only) is merged
        into every device's running configuration.

        The stack's deployment owns, for the fleet, every device-owned key the recipe
        defines: the keys it sets are merged, the others reset (``reset`` runs before the
        merge and the new version's defaults, ``KernelConfigResolver``), so a key removed from
        ``device_configuration`` returns to the recipe's default on the next revision, and a
        changed default reaches devices whose running configuration still holds the old one.
        Keys the recipe does not define (an operator's own, a retired key) are left alone.
        The cost, in docs/greengrass.md: each revision also resets what another deployment
        (a site's thing group) merged into those keys.
        """
        owned = self.recipe["ComponentConfiguration"]["DefaultConfiguration"]
        reset = [
            "/" + key.replace("~", "~0").replace("/", "~1")
            for key in sorted(owned)
            if key not in device_configuration
        ]
        deployment = greengrassv2.CfnDeployment
        return deployment(
            self,
            "FleetDeployment",
            target_arn=self.thing_group.attr_arn,
            deployment_name=Fn.join("", [self.component_name, " ", self.component_version]),
            components={
                self.component_name: deployment.ComponentDeploymentSpecificationProperty(
                    component_version=self.component.attr_component_version,
                    configuration_update=deployment.ComponentConfigurationUpdateProperty(
                        merge=json.dumps(device_configuration, sort_keys=True)
                        if device_configuration
                        else None,
                        reset=reset or None,
                    ),
                )
            },
            deployment_policies=deployment.DeploymentPoliciesProperty(
                failure_handling_policy="ROLLBACK",
                component_update_policy=deployment.DeploymentComponentUpdatePolicyProperty(
                    action="NOTIFY_COMPONENTS", timeout_in_seconds=60
                ),
                configuration_validation_policy=(
                    deployment.DeploymentConfigurationValidationPolicyProperty(
                        timeout_in_seconds=60
                    )
                ),
            ),
            iot_job_configuration=deployment.DeploymentIoTJobConfigurationProperty(
                job_executions_rollout_config=deployment.IoTJobExecutionsRolloutConfigProperty(
                    maximum_per_minute=ROLLOUT_DEVICES_PER_MINUTE
                ),
                abort_config=deployment.IoTJobAbortConfigProperty(
                    criteria_list=[
                        deployment.IoTJobAbortCriteriaProperty(
                            action="CANCEL",
                            failure_type="ALL",
                            min_number_of_executed_things=ROLLOUT_ABORT_MIN_DEVICES,
                            threshold_percentage=ROLLOUT_ABORT_FAILED_PERCENT,
                        )
                    ]
                ),
                timeout_config=deployment.IoTJobTimeoutConfigProperty(
                    in_progress_timeout_in_minutes=ROLLOUT_DEVICE_TIMEOUT_MINUTES
                ),
            ),
        )


# Rollout of a new component version to the thing group.
ROLLOUT_DEVICES_PER_MINUTE = 20
# Stop the rollout once this share of at least this many devices failed, timed out or was
# rejected: a broken version then reaches few devices (each rolls back on its own).
ROLLOUT_ABORT_FAILED_PERCENT = 20
ROLLOUT_ABORT_MIN_DEVICES = 5
# Per device: the Install step alone may take recipes.INSTALL_TIMEOUT_SECONDS (torch on a
# small board), and the nucleus retries it; twice that, plus start-up, is the bound.
ROLLOUT_DEVICE_TIMEOUT_MINUTES = 2 * recipes.INSTALL_TIMEOUT_SECONDS // 60 + 10


def _replacement_identity(stack: Stack, resolved: Any) -> dict[str, Any]:
    """For each resource the recipe references, its type and the properties whose change
    would replace it (a new generated name behind the same logical ID)."""
    by_logical_id = {
        str(stack.resolve(stack.get_logical_id(node))): node
        for node in stack.node.find_all()
        if isinstance(node, CfnResource)
    }
    identity: dict[str, Any] = {}
    for logical_id in sorted(set(template_references(resolved))):
        resource = by_logical_id.get(logical_id)
        if resource is None:
            continue  # a parameter or pseudo parameter
        properties = stack.resolve(resource._cfn_properties)
        kind = resource.cfn_resource_type
        replacing = _REPLACING_PROPERTIES.get(kind)
        identity[logical_id] = {
            "Type": kind,
            "Properties": properties
            if replacing is None
            else {name: properties.get(name) for name in replacing},
        }
    return identity


def template_references(value: Any) -> Iterator[str]:
    """Logical IDs named by Ref and Fn::GetAtt anywhere in a resolved value."""
    if isinstance(value, Mapping):
        if set(value) == {"Ref"} and isinstance(value["Ref"], str):
            yield value["Ref"]
        elif set(value) == {"Fn::GetAtt"}:
            yield str(value["Fn::GetAtt"][0])
        else:
            for item in value.values():
                yield from template_references(item)
    elif isinstance(value, list):
        for item in value:
            yield from template_references(item)
