"""The whole stack: no broad grants, the wiring, one config source, the outputs, alarms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from stack_template import (
    REPO_ROOT,
    actions_of,
    arn_of,
    cdk_context,
    logical_id,
    render,
    resource_json,
    synthesize,
)

from infra.config import InfraConfig, StackConfig
from sfl.build import recipes
from sfl.core.config import ConfigError, FederationConfig
from sfl.core.resources import UPDATES_BUCKET, ResourceNames

# Each role's exact access is proven against the calls its code makes, in
# test_least_privilege.py; here, what no policy may ever hold.


def all_policy_statements(template_json: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for logical, resource in template_json["Resources"].items():
        props = resource.get("Properties", {})
        documents = [props.get("PolicyDocument"), props.get("AssumeRolePolicyDocument")]
        documents += [p["PolicyDocument"] for p in props.get("Policies", [])]
        for document in filter(None, documents):
            found += [(logical, s) for s in document["Statement"]]
    return found


def test_no_policy_allows_every_action_of_a_service(synthesized):
    for logical, statement in all_policy_statements(synthesized.template_json):
        if statement["Effect"] != "Allow":
            continue
        for action in actions_of(statement):
            assert action != "*" and not action.endswith(":*"), (logical, action)


def test_no_identity_policy_uses_a_wildcard_action(synthesized):
    identity_types = {"AWS::IAM::Policy", "AWS::IAM::Role", "AWS::IAM::ManagedPolicy"}
    resources = synthesized.template_json["Resources"]
    for logical, statement in all_policy_statements(synthesized.template_json):
        if resources[logical]["Type"] in identity_types:
            assert not any("*" in a for a in actions_of(statement)), (logical, statement)


def test_only_cdk_handlers_use_a_managed_policy_and_it_is_basic_execution(synthesized):
    roles = synthesized.resources("AWS::IAM::Role")
    ours = {
        logical_id(r)
        for r in (
            synthesized.stack.rounds.initiator.role,
            synthesized.stack.rounds.averager.role,
            synthesized.stack.edge.device_role,
        )
    }
    for logical, role in roles.items():
        managed = role["Properties"].get("ManagedPolicyArns", [])
        if logical in ours:
            assert managed == []
        for arn in managed:
            text = json.dumps(arn)
            assert "FullAccess" not in text
            assert ":iam::aws:policy/service-role/AWSLambdaBasicExecutionRole" in text, text


def test_nothing_is_named_by_hand(synthesized):
    named = {
        "AWS::S3::Bucket": "BucketName",
        "AWS::DynamoDB::Table": "TableName",
        "AWS::Lambda::Function": "FunctionName",
        "AWS::IAM::Role": "RoleName",
        "AWS::SQS::Queue": "QueueName",
        "AWS::Logs::LogGroup": "LogGroupName",
        "AWS::Events::Rule": "Name",
    }
    for resource_type, name_property in named.items():
        for logical, resource in synthesized.resources(resource_type).items():
            assert name_property not in resource.get("Properties", {}), logical


def test_names_the_installer_reads_derive_from_the_stack(synthesized):
    """The IoT names an operator types and the names the Greengrass installer looks up are
    built from the stack's name (or its role's), so two stacks never share one."""
    derived = {
        "AWS::IoT::RoleAlias": ("RoleAlias", "<Ref:AWS::StackName>-TokenExchangeRoleAlias"),
        "AWS::IoT::ThingGroup": ("ThingGroupName", "<Ref:AWS::StackName>-Devices"),
        "AWS::IoT::Policy": (
            "PolicyName",
            "GreengrassTESCertificatePolicy<Ref:AWS::StackName>-TokenExchangeRoleAlias",
        ),
        "AWS::IAM::ManagedPolicy": (
            "ManagedPolicyName",
            f"<Ref:{logical_id(synthesized.stack.edge.device_role)}>Access",
        ),
    }
    for resource_type, (name_property, expected) in derived.items():
        (resource,) = synthesized.resources(resource_type).values()
        assert render(resource["Properties"][name_property]) == expected


# --- wiring ----------------------------------------------------------------------------------


def test_updates_bucket_notifies_the_averager_of_new_updates_only(synthesized):
    stack = synthesized.stack
    updates = logical_id(stack.storage.updates_bucket)
    averager = logical_id(stack.rounds.averager)
    (notifications,) = synthesized.resources("Custom::S3BucketNotifications").values()
    props = notifications["Properties"]
    assert props["BucketName"] == {"Ref": updates}
    assert props["NotificationConfiguration"] == {
        "LambdaFunctionConfigurations": [
            {
                "Events": ["s3:ObjectCreated:*"],
                "Filter": {
                    "Key": {
                        "FilterRules": [
                            {"Name": "suffix", "Value": UPDATES_BUCKET.notify_suffix},
                            {"Name": "prefix", "Value": UPDATES_BUCKET.notify_prefix},
                        ]
                    }
                },
                "LambdaFunctionArn": arn_of(averager),
            }
        ]
    }
    synthesized.template.has_resource_properties(
        "AWS::Lambda::Permission",
        {
            "Action": "lambda:InvokeFunction",
            "FunctionName": arn_of(averager),
            "Principal": "s3.amazonaws.com",
            "SourceArn": arn_of(updates),
            "SourceAccount": {"Ref": "AWS::AccountId"},
        },
    )


def test_lambdas_and_devices_read_one_configuration(synthesized):
    stack = synthesized.stack
    refs = {
        "models_bucket": logical_id(stack.storage.models_bucket),
        "updates_bucket": logical_id(stack.storage.updates_bucket),
        "clients_table": logical_id(stack.state.clients_table),
        "rounds_table": logical_id(stack.state.rounds_table),
    }
    expected_names = {ResourceNames.ENV[attr]: {"Ref": logical} for attr, logical in refs.items()}
    federation = FederationConfig.from_mapping(cdk_context()["sfl"])
    for function in (stack.rounds.initiator, stack.rounds.averager):
        env = resource_json(synthesized.template_json, function)["Properties"]["Environment"][
            "Variables"
        ]
        assert {k: env[k] for k in expected_names} == expected_names
        assert {k: env[k] for k in federation.to_env()} == federation.to_env()
    # The devices' component configuration: the same config and names, through sfl.build.recipes.
    (component,) = synthesized.resources("AWS::GreengrassV2::ComponentVersion").values()
    recipe = json.loads(render(component["Properties"]["InlineRecipe"]))
    placeholders = ResourceNames(**{attr: f"<Ref:{lg}>" for attr, lg in refs.items()})
    assert recipe["ComponentConfiguration"]["DefaultConfiguration"] == {
        **recipes.default_configuration(federation, placeholders, region="<Ref:AWS::Region>"),
        "accessControl": recipes.notice_access_control(stack.notice_topic),
    }
    # Round notices: the initiator publishes where the devices subscribe.
    initiator_env = resource_json(synthesized.template_json, stack.rounds.initiator)["Properties"][
        "Environment"
    ]["Variables"]
    assert initiator_env["SFL_NOTICE_TOPIC"] == stack.notice_topic
    assert recipe["Manifests"][0]["Lifecycle"]["Run"]["Setenv"]["SFL_NOTICE_TOPIC"] == (
        stack.notice_topic
    )


def test_outputs_name_everything_an_operator_needs(synthesized):
    outputs = synthesized.template_json["Outputs"]
    assert set(outputs) == {
        "AlarmNames",
        "DashboardUrl",
        "ModelsBucketName",
        "UpdatesBucketName",
        "ClientsTableName",
        "RoundsTableName",
        "InitiatorFunctionName",
        "AveragerFunctionName",
        "InitiatorLogGroupName",
        "AveragerLogGroupName",
        "FailedInvocationsQueueUrl",
        "AlarmTopicArn",
        "TokenExchangeRoleName",
        "TokenExchangeRoleAliasName",
        "NucleusPolicyName",
        "DeviceIotPolicyName",
        "ThingGroupName",
        "ComponentName",
        "ComponentVersion",
        "DeploymentId",
        "DeviceSetupCommand",
    }
    edge = synthesized.stack.edge
    stack_name = {"Ref": "AWS::StackName"}
    alias = {"Fn::Join": ["-", [stack_name, "TokenExchangeRoleAlias"]]}
    assert outputs["TokenExchangeRoleAliasName"]["Value"] == alias
    assert outputs["DeviceIotPolicyName"]["Value"] == {
        "Fn::Join": ["", ["GreengrassTESCertificatePolicy", alias]]
    }
    assert outputs["ComponentVersion"]["Value"] == edge.component_version
    command = render(outputs["DeviceSetupCommand"]["Value"])
    for flag in (
        "--thing-name <THING_NAME>",
        "--thing-group-name <Ref:AWS::StackName>-Devices",
        "--thing-policy-name GreengrassTESCertificatePolicy<Ref:AWS::StackName>-"
        "TokenExchangeRoleAlias",
        "--tes-role-alias-name <Ref:AWS::StackName>-TokenExchangeRoleAlias",
        f"--tes-role-name <Ref:{logical_id(edge.device_role)}>",
        "--provision true",
    ):
        assert flag in command


# --- configuration ---------------------------------------------------------------------------


def test_context_overrides_reach_the_resources(tmp_path: Path):
    context = cdk_context()
    context["sfl"] = {**context["sfl"], "lr": 0.1, "task": "mnist"}
    context["sfl_infra"] = {
        **context["sfl_infra"],
        "stack_prefix": "Other",
        "schedule_minutes": 10,
        "averager_memory_mb": 4096,
        "retain_data": True,
        "alarm_email": "ops@example.com",
    }
    stack, assembly_dir = synthesize(tmp_path, context)
    assert stack.stack_name == "Other-Federation"
    template = json.loads((assembly_dir / stack.template_file).read_text())
    resources = template["Resources"]
    averager = resources[logical_id(stack.rounds.averager)]["Properties"]
    assert averager["MemorySize"] == 4096
    assert averager["Environment"]["Variables"]["SFL_LR"] == "0.1"
    assert averager["Environment"]["Variables"]["SFL_TASK"] == "mnist"
    (rule,) = [r for r in resources.values() if r["Type"] == "AWS::Events::Rule"]
    assert rule["Properties"]["ScheduleExpression"] == "rate(10 minutes)"
    kept = [
        r for r in resources.values() if r["Type"] in {"AWS::S3::Bucket", "AWS::DynamoDB::Table"}
    ]
    assert {r["DeletionPolicy"] for r in kept} == {"Retain"}
    assert stack.edge.component_name == "Other.EdgeClient"
    (subscription,) = [
        r["Properties"] for r in resources.values() if r["Type"] == "AWS::SNS::Subscription"
    ]
    assert subscription["Protocol"] == "email" and subscription["Endpoint"] == "ops@example.com"
    assert subscription["TopicArn"] == {"Ref": logical_id(stack.alarm_topic)}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sfl_infra", {"schedule_minutes": 0}, r"schedule_minutes.*0.*an integer from 1 to 1440"),
        ("sfl_infra", {"log_retention_days": 31}, r"log_retention_days.*31.*one of 1, 3, 5"),
        ("sfl_infra", {"retain_data": "yes"}, r"retain_data.*'yes' is not a bool.*true or false"),
        ("sfl_infra", {"averager_memory_mb": True}, r"averager_memory_mb.*True is not a int"),
        ("sfl_infra", {"stack_prefix": "9lives"}, r"stack_prefix.*'9lives'.*a letter"),
        ("sfl_infra", {"memory": 1}, r"unknown config key\(s\) 'memory'"),
        ("sfl_infra", {"alarm_email": "ops at example"}, r"alarm_email.*'ops at example'.*e-mail"),
        ("sfl", {"lr": -1}, r"'lr'.*-1.*allowed"),
        ("sfl", {"selection": "nobody"}, r"'selection'.*'nobody'.*fast_clients"),
        ("sfl", "not json", r"context 'sfl'.*not a JSON object"),
        # A deployment sets device-owned settings only; the stack's own travel in the recipe.
        (
            "sfl_infra",
            {"device_configuration": {"modelsBucket": "elsewhere"}},
            r"device_configuration.*'modelsBucket'.*device-owned component settings",
        ),
        ("sfl_infra", {"device_configuration": "dataDir=/x"}, r"device_configuration.*not a dict"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(key, value, message):
    context = {"sfl": {}, "sfl_infra": {}, key: value}
    with pytest.raises(ConfigError, match=message):
        StackConfig.from_context(context.get)


def test_averager_may_not_outlive_the_aggregation_lease():
    context = {
        "sfl": {"aggregation_lease_seconds": 120},
        "sfl_infra": {"averager_timeout_seconds": 300},
    }
    with pytest.raises(ConfigError, match=r"averager_timeout_seconds.*300.*at most.*120"):
        StackConfig.from_context(context.get)


def test_context_given_on_the_command_line_as_json_is_read():
    context = {"sfl": '{"lr": 0.2}', "sfl_infra": '{"schedule_minutes": 3}'}
    config = StackConfig.from_context(context.get)
    assert config.federation.lr == 0.2
    assert config.infra.schedule_minutes == 3


def test_missing_context_means_defaults():
    config = StackConfig.from_context({}.get)
    assert config.infra == InfraConfig()
    assert config.federation == FederationConfig()


def test_alarms_cover_lambda_errors_throttles_failed_events_and_an_overdue_round(synthesized):
    alarms = synthesized.resources("AWS::CloudWatch::Alarm")
    by_metric = {a["Properties"].get("MetricName"): a["Properties"] for a in alarms.values()}

    assert sorted(by_metric) == ["Errors", "NumberOfMessagesSent", "OpenRoundAge", "Throttles"]
    assert len(alarms) == 6
    # A failed event alarms once, in the period it was sent; the queue keeps it for days.
    failed = by_metric["NumberOfMessagesSent"]
    assert failed["Namespace"] == "AWS/SQS" and failed["Statistic"] == "Sum"
    assert failed["Threshold"] == 1 and failed["EvaluationPeriods"] == 1
    assert failed["Dimensions"] == [
        {
            "Name": "QueueName",
            "Value": {
                "Fn::GetAtt": [logical_id(synthesized.stack.rounds.failure_queue), "QueueName"]
            },
        }
    ]
    overdue = by_metric["OpenRoundAge"]
    assert overdue["Namespace"] == "ServerlessFederatedLearning"
    deadline = synthesized.stack.node.try_get_context("sfl")["round_deadline_seconds"]
    schedule = synthesized.stack.node.try_get_context("sfl_infra")["schedule_minutes"]
    assert overdue["Threshold"] == deadline + 2 * 60 * schedule
    errors = [a for a in alarms.values() if a["Properties"].get("MetricName") == "Errors"]
    assert len(errors) == 2
    assert all(a["Properties"]["Threshold"] == 1 for a in errors)


def test_every_alarm_notifies_the_ssl_only_topic_when_it_fires_and_clears(synthesized):
    topic = {"Ref": logical_id(synthesized.stack.alarm_topic)}
    for alarm in synthesized.resources("AWS::CloudWatch::Alarm").values():
        assert alarm["Properties"]["AlarmActions"] == [topic]
        assert alarm["Properties"]["OKActions"] == [topic]
    assert synthesized.resources("AWS::SNS::Subscription") == {}  # no alarm_email by default
    (policy,) = synthesized.resources("AWS::SNS::TopicPolicy").values()
    assert policy["Properties"]["Topics"] == [topic]
    statements = {s["Effect"]: s for s in policy["Properties"]["PolicyDocument"]["Statement"]}
    assert sorted(statements) == ["Allow", "Deny"]
    assert statements["Deny"]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    # The policy replaces SNS's default one: CloudWatch must be allowed, for these alarms only.
    allow = statements["Allow"]
    assert allow["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert allow["Action"] == "sns:Publish" and allow["Resource"] == topic
    assert allow["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
    alarm_arns = allow["Condition"]["ArnEquals"]["aws:SourceArn"]
    alarms = synthesized.resources("AWS::CloudWatch::Alarm")
    assert sorted(alarm_arns, key=str) == sorted(
        ({"Fn::GetAtt": [logical, "Arn"]} for logical in alarms), key=str
    )
    outputs = synthesized.template_json["Outputs"]
    assert outputs["AlarmTopicArn"]["Value"] == topic


def test_the_deploy_guide_documents_every_stack_key_and_output(synthesized):
    """docs/deploy.md is where an operator looks: every sfl_infra key and every output."""
    import dataclasses
    import re

    guide = (REPO_ROOT / "docs" / "deploy.md").read_text()
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", guide, flags=re.MULTILINE))
    assert {f.name for f in dataclasses.fields(InfraConfig)} <= rows
    documented = set(re.findall(r"`([A-Z][A-Za-z]+)`", guide))
    assert set(synthesized.template_json["Outputs"]) <= documented
