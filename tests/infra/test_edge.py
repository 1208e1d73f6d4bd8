"""Devices: certificate-based credentials through a role alias, access to their own keys only,
and the edge client's Greengrass component built by ``sfl.build.recipes``."""

from __future__ import annotations

import fnmatch
import json
from typing import Any

import pytest
from aws_cdk import Stack, assertions
from stack_template import (
    REPO_ROOT,
    Synthesized,
    actions_of,
    arn_of,
    bare_app_stack,
    logical_id,
    object_arn,
    render,
    resource_json,
    resources_of,
    statements_of,
)

from infra.edge import FederationEdge
from sfl.build import recipes
from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames

NAMES = ResourceNames(
    models_bucket="models-bucket",
    updates_bucket="updates-bucket",
    clients_table="clients-table",
    rounds_table="rounds-table",
)
NOTICE_TOPIC = "sfl/Sfl-Test/default/rounds"


def build(stack: Stack, federation: FederationConfig | None = None) -> FederationEdge:
    return FederationEdge(
        stack,
        "Edge",
        component_name="com.example.sfl.EdgeClient",
        notice_topic=NOTICE_TOPIC,
        federation=federation or FederationConfig(),
        resource_names=NAMES,
        source_root=REPO_ROOT,
    )


@pytest.fixture
def edge(bare_stack: Stack) -> tuple[FederationEdge, assertions.Template]:
    construct = build(bare_stack)
    return construct, assertions.Template.from_stack(bare_stack)


def recipe_of(template: assertions.Template) -> dict[str, Any]:
    component = next(iter(template.find_resources("AWS::GreengrassV2::ComponentVersion").values()))
    recipe: dict[str, Any] = json.loads(render(component["Properties"]["InlineRecipe"]))
    return recipe


def test_device_role_is_assumed_only_by_the_iot_credentials_provider(edge):
    _, template = edge
    template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    {
                        "Action": "sts:AssumeRole",
                        "Effect": "Allow",
                        "Principal": {"Service": "credentials.iot.amazonaws.com"},
                    }
                ]
            },
            "ManagedPolicyArns": assertions.Match.absent(),
        },
    )


def test_role_alias_points_at_the_device_role(edge):
    construct, template = edge
    template.resource_count_is("AWS::IoT::RoleAlias", 1)
    template.has_resource_properties(
        "AWS::IoT::RoleAlias",
        {
            "RoleArn": arn_of(logical_id(construct.device_role)),
            "CredentialDurationSeconds": 3600,
            # Named after the stack: the installer's --tes-role-alias-name takes it
            "RoleAlias": {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}, "TokenExchangeRoleAlias"]]},
        },
    )


def test_devices_get_a_thing_group_to_deploy_to(edge):
    _, template = edge
    template.resource_count_is("AWS::IoT::ThingGroup", 1)
    template.has_resource_properties(
        "AWS::IoT::ThingGroup",
        {"ThingGroupName": {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}, "Devices"]]}},
    )


def test_component_is_the_generated_recipe_with_the_stack_s_names(edge):
    construct, template = edge
    recipe = recipe_of(template)
    assert recipe["ComponentName"] == "com.example.sfl.EdgeClient"
    assert recipe["ComponentVersion"] == construct.component_version
    assert recipe["ComponentDependencies"]["aws.greengrass.TokenExchangeService"] == {
        "VersionRequirement": ">=2.0.0 <3.0.0",
        "DependencyType": "HARD",
    }
    expected = recipes.default_configuration(FederationConfig(), NAMES, region="<Ref:AWS::Region>")
    assert recipe["ComponentConfiguration"]["DefaultConfiguration"] == {
        **expected,
        "accessControl": recipes.notice_access_control(NOTICE_TOPIC),
    }


def test_component_artifact_is_the_stack_s_client_zip(edge):
    construct, template = edge
    for manifest in recipe_of(template)["Manifests"]:  # one per architecture
        (artifact,) = manifest["Artifacts"]
        key = construct.client_artifact.s3_object_key
        assert artifact["Uri"].endswith(f"/{key}")
        assert artifact["Uri"].startswith("s3://<Sub:cdk-hnb659fds-assets-")
        assert artifact["Unarchive"] == "ZIP"
        # Greengrass unpacks into a folder named after the key; the run script looks there.
        assert f"{{artifacts:decompressedPath}}/{key.removesuffix('.zip')}" in json.dumps(manifest)


def test_component_version_changes_with_the_configuration():
    versions = {
        build(bare_app_stack(), FederationConfig(task=task)).component_version
        for task in ("digits", "mnist", "digits")
    }
    assert len(versions) == 2
    major, minor, patch = next(iter(versions)).split(".")
    assert (major, minor) == ("0", "1") and patch.isdigit()


# --- what the stack grants devices -----------------------------------------------------------


def device_statements(synthesized: Synthesized) -> list[dict[str, Any]]:
    role = synthesized.stack.edge.device_role
    return statements_of(
        synthesized.template_json, logical_id(role.node.find_child("DefaultPolicy"))
    )


def test_devices_read_models_and_the_assignment(synthesized):
    """The model versions (not their lineage records), the promoted model, the assignment;
    no listing (tests/infra/test_device_reads.py proves what that refuses)."""
    models = logical_id(synthesized.stack.storage.models_bucket)
    (reads,) = [s for s in device_statements(synthesized) if actions_of(s) == ["s3:GetObject"]]
    expected = [
        object_arn(models, "models/global/v*.safetensors"),
        object_arn(models, "models/global/promoted.safetensors"),
        object_arn(models, "rounds/current.json"),
    ]
    assert sorted(map(str, resources_of(reads))) == sorted(map(str, expected))
    assert not [s for s in device_statements(synthesized) if "s3:ListBucket" in actions_of(s)]


def test_devices_write_updates_only_under_their_own_thing_name(synthesized):
    """Only its own round keys, and only stored so the averager can read them back: under
    the updates key (never SSE-S3 or another key, which others could read)."""
    updates = logical_id(synthesized.stack.storage.updates_bucket)
    key = logical_id(synthesized.stack.storage.updates_key)
    writes = [s for s in device_statements(synthesized) if "s3:PutObject" in actions_of(s)]
    assert writes == [
        {
            "Action": "s3:PutObject",
            "Condition": {
                "StringEqualsIfExists": {
                    "s3:x-amz-storage-class": "STANDARD",
                    "s3:x-amz-server-side-encryption": "aws:kms",
                    "s3:x-amz-server-side-encryption-aws-kms-key-id": {"Fn::GetAtt": [key, "Arn"]},
                },
                "Null": {"s3:x-amz-server-side-encryption-customer-algorithm": "true"},
            },
            "Effect": "Allow",
            "Resource": object_arn(
                updates, "updates/${credentials-iot:ThingName}/round-*.safetensors"
            ),
        }
    ]


def test_devices_write_only_their_heartbeat_in_their_own_client_item(synthesized):
    clients = logical_id(synthesized.stack.state.clients_table)
    (table,) = [
        s for s in device_statements(synthesized) if actions_of(s)[0].startswith("dynamodb:")
    ]
    assert table["Resource"] == arn_of(clients)
    assert table["Condition"] == {
        "ForAllValues:StringEquals": {
            "dynamodb:LeadingKeys": ["${credentials-iot:ThingName}"],
            # Keys only, each typed by DynamoDB: not the item's expiry, nor registered_at.
            "dynamodb:Attributes": [
                "client_id",
                "last_seen",
                "active_shard",  # the selection index's partition (sfl.core.resources)
            ],
        },
        "StringEqualsIfExists": {
            "dynamodb:Select": "SPECIFIC_ATTRIBUTES",
            "dynamodb:ReturnValues": ["NONE", "UPDATED_OLD", "UPDATED_NEW"],
        },
    }


# --- what the Greengrass installer and nucleus find ------------------------------------------


def test_the_installer_finds_the_stack_s_role_access_policy_attached(synthesized):
    """DeviceProvisioningHelper looks up 'arn:<partition>:iam::<account>:policy/<role>Access'
    (path '/') and creates and attaches its own only if that is missing."""
    edge = synthesized.stack.edge
    policy = resource_json(synthesized.template_json, edge.nucleus_policy)
    props = policy["Properties"]
    assert props["Path"] == "/"
    assert render(props["ManagedPolicyName"]) == f"<Ref:{logical_id(edge.device_role)}>Access"
    assert props["Roles"] == [{"Ref": logical_id(edge.device_role)}]


def test_the_role_access_policy_lets_the_nucleus_fetch_the_artifact_and_nothing_else(synthesized):
    edge = synthesized.stack.edge
    statements = resource_json(synthesized.template_json, edge.nucleus_policy)["Properties"][
        "PolicyDocument"
    ]["Statement"]
    assets = (
        "arn:<Ref:AWS::Partition>:s3:::<Sub:cdk-hnb659fds-assets-${AWS::AccountId}-${AWS::Region}>"
    )
    assert [(s["Action"], render(s["Resource"])) for s in statements] == [
        ("s3:GetBucketLocation", assets),
        ("s3:GetObject", f"{assets}/{edge.client_artifact.s3_object_key}"),
    ]


def test_devices_have_nothing_else(synthesized):
    statements = device_statements(synthesized)
    assert sorted(tuple(actions_of(s)) for s in statements) == [
        ("dynamodb:UpdateItem",),
        ("s3:GetObject",),  # models and the assignment
        # No ListBucket: the client takes the 403 of an assignment not yet published for
        # "no round yet" (edge_client.client.EdgeClient.poll).
        ("s3:PutObject",),
    ]
    role = resource_json(synthesized.template_json, synthesized.stack.edge.device_role)
    assert "ManagedPolicyArns" not in role["Properties"]  # the Access policy attaches itself
    attached = [
        r
        for r in synthesized.resources("AWS::IAM::ManagedPolicy").values()
        if {"Ref": logical_id(synthesized.stack.edge.device_role)} in r["Properties"]["Roles"]
    ]
    assert len(attached) == 1


def device_iot_grants(synthesized: Any) -> dict[str, list[str]]:
    """The core devices' IoT policy: each action and the resources it is allowed on."""
    edge = synthesized.stack.edge
    document = resource_json(synthesized.template_json, edge.device_iot_policy)["Properties"][
        "PolicyDocument"
    ]
    grants: dict[str, list[str]] = {}
    for statement in document["Statement"]:
        for action in actions_of(statement):
            grants.setdefault(action, []).extend(render(r) for r in resources_of(statement))
    return grants


def test_core_device_iot_policy_allows_the_role_alias_and_the_device_s_own_topics(synthesized):
    edge = synthesized.stack.edge
    grants = device_iot_grants(synthesized)
    assert grants["iot:AssumeRoleWithCertificate"] == [
        f"<GetAtt:{logical_id(edge.role_alias)}.RoleAliasArn>"
    ]
    arn = "arn:<Ref:AWS::Partition>:iot:<Ref:AWS::Region>:<Ref:AWS::AccountId>"
    thing = "${iot:Connection.Thing.ThingName}"
    notices = synthesized.stack.notice_topic
    # Its own client ID and shadow exactly: a prefix match would let 'dev-1' act as 'dev-10'.
    assert grants["iot:Connect"] == [f"{arn}:client/{thing}"]
    assert grants["iot:GetThingShadow"] == [f"{arn}:thing/{thing}"]
    assert grants["iot:Subscribe"] == [
        f"{arn}:topicfilter/$aws/things/{thing}/jobs/*",
        f"{arn}:topicfilter/$aws/things/{thing}/shadow/*",
        f"{arn}:topicfilter/{notices}",
    ]
    for topic in grants["iot:Publish"]:
        assert topic.startswith(f"{arn}:topic/$aws/things/{thing}/")
    for topic in grants["iot:Receive"]:
        assert topic.startswith(f"{arn}:topic/$aws/things/{thing}/") or (
            topic == f"{arn}:topic/{notices}"
        )
    assert sorted(a for a in grants if a.startswith("greengrass:")) == [
        "greengrass:GetComponentVersionArtifact",
        "greengrass:GetDeploymentConfiguration",
        "greengrass:ListThingGroupsForCoreDevice",
        "greengrass:ResolveComponentCandidates",
    ]
    assert not any("*" in action for action in grants)


def test_devices_hear_round_notices_but_cannot_send_one(synthesized):
    """A device may subscribe to and receive the stack's notice topic, exactly, and may not
    publish to it: a hostile device must not be able to wake the whole fleet."""
    arn = "arn:<Ref:AWS::Partition>:iot:<Ref:AWS::Region>:<Ref:AWS::AccountId>"
    notices = synthesized.stack.notice_topic
    assert notices == f"sfl/{synthesized.stack.stack_name}/default/rounds"
    grants = device_iot_grants(synthesized)
    assert f"{arn}:topicfilter/{notices}" in grants["iot:Subscribe"]
    assert f"{arn}:topic/{notices}" in grants["iot:Receive"]
    # No publish grant reaches the notice topic (IoT policy wildcards: '*' any run, '?' one).
    topic = f"{arn}:topic/{notices}"
    assert not any(
        fnmatch.fnmatchcase(topic, pattern.replace("[", "[[]")) for pattern in grants["iot:Publish"]
    )
    # The component may subscribe to that topic through Greengrass IPC and nothing else.
    recipe = recipe_of(assertions.Template.from_json(synthesized.template_json))
    (policy,) = recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"][
        recipes.MQTT_PROXY_SERVICE
    ].values()
    assert policy["operations"] == [recipes.SUBSCRIBE_TO_IOT_CORE]
    assert policy["resources"] == [notices]
    run = recipe["Manifests"][0]["Lifecycle"]["Run"]["Setenv"]
    assert run["SFL_NOTICE_TOPIC"] == notices


# --- the fleet's deployment ------------------------------------------------------------------


def test_the_stack_deploys_its_component_version_to_its_thing_group(synthesized):
    edge = synthesized.stack.edge
    (deployment,) = synthesized.resources("AWS::GreengrassV2::Deployment").values()
    props = deployment["Properties"]
    assert props["TargetArn"] == {"Fn::GetAtt": [logical_id(edge.thing_group), "Arn"]}
    # GetAtt: CloudFormation creates the new version before the deployment that uses it and
    # deletes the old version only after the deployment moved off it.
    ((name, spec),) = props["Components"].items()
    assert name == edge.component_name
    assert spec["ComponentVersion"] == {
        "Fn::GetAtt": [logical_id(edge.component), "ComponentVersion"]
    }
    policies = props["DeploymentPolicies"]
    assert policies["FailureHandlingPolicy"] == "ROLLBACK"
    job = props["IotJobConfiguration"]
    (abort,) = job["AbortConfig"]["CriteriaList"]
    assert abort["Action"] == "CANCEL" and abort["FailureType"] == "ALL"
    assert job["JobExecutionsRolloutConfig"]["MaximumPerMinute"] > 0
    # A device may take the whole Install timeout, twice, before it runs the new version.
    timeout_minutes = job["TimeoutConfig"]["InProgressTimeoutInMinutes"]
    assert timeout_minutes * 60 > 2 * recipes.INSTALL_TIMEOUT_SECONDS


def test_the_deployment_merges_the_configured_device_settings_only_when_asked(edge):
    _, template = edge
    (deployment,) = template.find_resources("AWS::GreengrassV2::Deployment").values()
    ((_, spec),) = deployment["Properties"]["Components"].items()
    assert "Merge" not in spec["ConfigurationUpdate"]  # only resets to the recipe's defaults

    stack = bare_app_stack()
    FederationEdge(
        stack,
        "Edge",
        component_name="com.example.sfl.EdgeClient",
        notice_topic=NOTICE_TOPIC,
        federation=FederationConfig(),
        resource_names=NAMES,
        source_root=REPO_ROOT,
        device_configuration={"dataDir": "/mnt/fl-data"},
    )
    (deployment,) = (
        assertions.Template.from_stack(stack)
        .find_resources("AWS::GreengrassV2::Deployment")
        .values()
    )
    ((_, spec),) = deployment["Properties"]["Components"].items()
    assert json.loads(spec["ConfigurationUpdate"]["Merge"]) == {"dataDir": "/mnt/fl-data"}


def test_component_version_changes_when_a_referenced_table_would_be_replaced(monkeypatch):
    """A replaced table gets a new generated name: the recipe's configuration then differs,
    so the version must too, or CloudFormation's create-then-delete collides on it."""
    import dataclasses

    from infra import state as state_module
    from sfl.core.resources import CLIENTS_TABLE, KeyAttribute

    def version() -> str:
        stack = bare_app_stack()
        state = state_module.FederationState(stack, "State", retain_data=False)
        names = ResourceNames(
            models_bucket="m",
            updates_bucket="u",
            clients_table=state.clients_table.table_name,
            rounds_table=state.rounds_table.table_name,
        )
        return FederationEdge(
            stack,
            "Edge",
            component_name="com.example.sfl.EdgeClient",
            notice_topic=NOTICE_TOPIC,
            federation=FederationConfig(),
            resource_names=names,
            source_root=REPO_ROOT,
        ).component_version

    before = version()
    assert version() == before
    # A new partition key replaces the table (same logical ID, new generated name).
    rekeyed = dataclasses.replace(CLIENTS_TABLE, partition_key=KeyAttribute("device_id", "S"))
    monkeypatch.setattr(state_module, "CLIENTS_TABLE", rekeyed)
    assert version() != before
