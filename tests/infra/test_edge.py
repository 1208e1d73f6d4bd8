"""Devices: certificate-based credentials through a role alias, access to their own keys only."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk import Stack, assertions
from stack_template import (
    Synthesized,
    actions_of,
    arn_of,
    logical_id,
    object_arn,
    resources_of,
    statements_of,
)

from infra.edge import FederationEdge, component_version, edge_client_recipe

CONFIGURATION = {"SFL_MODELS_BUCKET": "models-bucket", "SFL_LR": "0.05"}


@pytest.fixture
def edge(bare_stack: Stack) -> tuple[FederationEdge, assertions.Template]:
    construct = FederationEdge(
        bare_stack,
        "Edge",
        component_name="com.example.sfl.EdgeClient",
        default_configuration=CONFIGURATION,
    )
    return construct, assertions.Template.from_stack(bare_stack)


def recipe_of(template: assertions.Template) -> dict[str, Any]:
    component = next(iter(template.find_resources("AWS::GreengrassV2::ComponentVersion").values()))
    recipe: dict[str, Any] = json.loads(component["Properties"]["InlineRecipe"])
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


def test_component_recipe_carries_the_configuration_and_needs_token_exchange(edge):
    construct, template = edge
    recipe = recipe_of(template)
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert recipe["ComponentName"] == "com.example.sfl.EdgeClient"
    assert recipe["ComponentVersion"] == construct.component_version
    assert recipe["ComponentDependencies"]["aws.greengrass.TokenExchangeService"] == {
        "VersionRequirement": ">=2.0.0 <3.0.0",
        "DependencyType": "HARD",
    }
    assert recipe["ComponentConfiguration"]["DefaultConfiguration"] == CONFIGURATION
    (manifest,) = recipe["Manifests"]
    assert manifest["Lifecycle"]["Setenv"] == {
        "SFL_LR": "{configuration:/SFL_LR}",
        "SFL_MODELS_BUCKET": "{configuration:/SFL_MODELS_BUCKET}",
    }


def test_component_version_changes_exactly_when_the_recipe_does():
    def version(configuration: dict[str, str]) -> str:
        recipe = edge_client_recipe(
            component_name="c", component_version="{version}", default_configuration=configuration
        )
        return component_version(recipe)

    assert version({"SFL_LR": "0.05"}) == version({"SFL_LR": "0.05"})
    assert version({"SFL_LR": "0.05"}) != version({"SFL_LR": "0.1"})
    major, minor, patch = version({"SFL_LR": "0.05"}).split(".")
    assert (major, minor) == ("0", "1")
    assert patch.isdigit()


# --- what the stack grants devices -----------------------------------------------------------


def device_statements(synthesized: Synthesized) -> list[dict[str, Any]]:
    role = synthesized.stack.edge.device_role
    return statements_of(
        synthesized.template_json, logical_id(role.node.find_child("DefaultPolicy"))
    )


def test_devices_read_models_and_the_assignment_only(synthesized):
    storage = synthesized.stack.storage
    models = logical_id(storage.models_bucket)
    reads = [s for s in device_statements(synthesized) if actions_of(s) == ["s3:GetObject"]]
    assert len(reads) == 1
    assert resources_of(reads[0]) == [
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
        ("s3:GetObject",),
        # Listing answers 404 rather than 403 while no assignment exists yet.
        ("s3:ListBucket",),
        ("s3:PutObject",),
    ]
    (listing,) = [s for s in statements if actions_of(s) == ["s3:ListBucket"]]
    assert listing["Resource"] == arn_of(models)
