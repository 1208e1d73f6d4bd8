"""Devices: certificate-based credentials through a role alias, access to their own keys only,
and the edge client's Greengrass component built by ``sfl.recipes``."""

from __future__ import annotations

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
    resources_of,
    statements_of,
)

from infra.edge import FederationEdge
from sfl import recipes
from sfl.config import FederationConfig
from sfl.resources import ResourceNames

NAMES = ResourceNames(
    models_bucket="models-bucket",
    updates_bucket="updates-bucket",
    clients_table="clients-table",
    rounds_table="rounds-table",
)


def build(stack: Stack, federation: FederationConfig | None = None) -> FederationEdge:
    return FederationEdge(
        stack,
        "Edge",
        component_name="com.example.sfl.EdgeClient",
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
            "RoleAlias": assertions.Match.absent(),  # CloudFormation names it
        },
    )


def test_devices_get_a_thing_group_to_deploy_to(edge):
    _, template = edge
    template.resource_count_is("AWS::IoT::ThingGroup", 1)
    template.has_resource_properties(
        "AWS::IoT::ThingGroup", {"ThingGroupName": assertions.Match.absent()}
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
    assert recipe["ComponentConfiguration"]["DefaultConfiguration"] == expected


def test_component_artifact_is_the_stack_s_client_zip(edge):
    construct, template = edge
    (manifest,) = recipe_of(template)["Manifests"]
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


def test_devices_read_models_the_assignment_and_their_client_code_only(synthesized):
    stack = synthesized.stack
    models = logical_id(stack.storage.models_bucket)
    (reads,) = [s for s in device_statements(synthesized) if actions_of(s) == ["s3:GetObject"]]
    client_zip, *model_objects = resources_of(reads)
    assert render(client_zip) == (
        "arn:<Ref:AWS::Partition>:s3:::<Sub:cdk-hnb659fds-assets-${AWS::AccountId}-"
        f"${{AWS::Region}}>/{stack.edge.client_artifact.s3_object_key}"
    )
    assert model_objects == [
        object_arn(models, "models/global/*"),
        object_arn(models, "rounds/current.json"),
    ]


def test_devices_write_updates_only_under_their_own_thing_name(synthesized):
    updates = logical_id(synthesized.stack.storage.updates_bucket)
    writes = [s for s in device_statements(synthesized) if "s3:PutObject" in actions_of(s)]
    assert writes == [
        {
            "Action": "s3:PutObject",
            "Effect": "Allow",
            "Resource": object_arn(updates, "updates/${credentials-iot:ThingName}/*"),
        }
    ]


def test_devices_write_only_their_own_client_item(synthesized):
    clients = logical_id(synthesized.stack.state.clients_table)
    table = [s for s in device_statements(synthesized) if actions_of(s)[0].startswith("dynamodb:")]
    assert table == [
        {
            "Action": ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"],
            "Condition": {
                "ForAllValues:StringEquals": {
                    "dynamodb:LeadingKeys": ["${credentials-iot:ThingName}"]
                }
            },
            "Effect": "Allow",
            "Resource": arn_of(clients),
        }
    ]


def test_devices_have_nothing_else(synthesized):
    models = logical_id(synthesized.stack.storage.models_bucket)
    statements = device_statements(synthesized)
    assert sorted(tuple(actions_of(s)) for s in statements) == [
        ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"),
        ("s3:GetObject",),  # models, the assignment, the client artifact
        # Listing answers 404 rather than 403 while no assignment exists yet.
        ("s3:ListBucket",),
        ("s3:PutObject",),
    ]
    (listing,) = [s for s in statements if actions_of(s) == ["s3:ListBucket"]]
    assert listing["Resource"] == arn_of(models)
