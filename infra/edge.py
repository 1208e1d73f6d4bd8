"""What devices get: a token-exchange role behind an IoT role alias, a thing group, a component.

Greengrass core devices never hold access keys: the Token Exchange Service trades the
device's X.509 certificate for short-lived credentials of ``device_role`` through
``role_alias``. The stack grants that role what a device may touch, scoped to the device's
own thing name (``${credentials-iot:ThingName}``). The component's recipe comes from
``sfl.recipes`` (the same generator ``sfl recipes`` uses), with the client artifact
(``sfl.artifact``) as an S3 asset of the stack.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import Stack, Stage, Token
from aws_cdk import aws_greengrassv2 as greengrassv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from sfl import artifact, recipes
from sfl.config import FederationConfig
from sfl.resources import ResourceNames

# The IAM policy variable AWS IoT's credential provider sets to the calling device's thing.
THING_NAME_VARIABLE = "${credentials-iot:ThingName}"


class FederationEdge(Construct):
    """Device credentials (role + role alias), the thing group, the Greengrass component.

    Attributes: ``device_role``, ``role_alias``, ``thing_group``, ``client_artifact``,
    ``component``, ``component_name``, ``component_version``, ``recipe``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        component_name: str,
        federation: FederationConfig,
        resource_names: ResourceNames,
        source_root: Path,
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
        self.role_alias = iot.CfnRoleAlias(
            self,
            "TokenExchangeRoleAlias",
            role_arn=self.device_role.role_arn,
            credential_duration_seconds=credential_duration_seconds,
        )
        # Devices join this group at installation; the operator deploys the component to it.
        self.thing_group = iot.CfnThingGroup(
            self,
            "Devices",
            thing_group_properties=iot.CfnThingGroup.ThingGroupPropertiesProperty(
                thing_group_description="Edge clients of the serverless federation"
            ),
        )

        # The client zip is deterministic: the same sources give the same asset hash. It is
        # written beside the cloud assembly, which stages it as the asset.
        stage = Stage.of(self)
        if stage is None:
            raise ValueError("the edge construct must be inside an App")
        built = artifact.build_client_artifact(
            Path(stage.outdir) / "sfl-edge-client" / artifact.ARCHIVE_NAME,
            source_root=source_root,
        )
        self.client_artifact = s3_assets.Asset(self, "ClientArtifact", path=str(built.path))
        key = self.client_artifact.s3_object_key
        # Greengrass fetches artifacts with the device's token-exchange credentials.
        self.device_role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["s3:GetObject"],
                resources=[self.client_artifact.bucket.arn_for_objects(key)],
            )
        )

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
        )
        # Component versions are immutable: a changed recipe or artifact must carry a new
        # version, or CloudFormation's replace-then-delete collides with the one it replaces.
        # The digest is taken over the resolved recipe (logical IDs, not token numbers).
        self.component_version = recipes.recipe_version(stack.resolve(draft), built.sha256)
        self.recipe = {**draft, "ComponentVersion": self.component_version}
        self.component = greengrassv2.CfnComponentVersion(
            self, "EdgeClientComponent", inline_recipe=stack.to_json_string(self.recipe)
        )
