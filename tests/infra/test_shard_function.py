"""The shard function (sharded aggregation): deployed only when configured, from the
averager's image with another entry point, and reachable by the averager alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from stack_template import (
    actions_of,
    cdk_context,
    logical_id,
    resource_json,
    resources_of,
    synthesize,
)

from infra.rounds import SHARD_HANDLER
from sfl.server.runtime import SHARD_FUNCTION_ENV


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    context = cdk_context()
    context["sfl"] = {**context.get("sfl", {}), "aggregation_shard_above": 500}
    stack, assembly = synthesize(tmp_path_factory.mktemp("cdk.out"), context)
    template = json.loads((Path(assembly) / stack.template_file).read_text())
    return stack, template


def _statements(template: dict[str, Any], role_logical_id: str) -> list[dict[str, Any]]:
    found = []
    for resource in template["Resources"].values():
        if resource["Type"] != "AWS::IAM::Policy":
            continue
        if {"Ref": role_logical_id} in resource["Properties"]["Roles"]:
            found.extend(resource["Properties"]["PolicyDocument"]["Statement"])
    return found


def test_the_shard_function_is_the_averager_image_with_the_shard_entry_point(
    sharded: tuple[Any, dict[str, Any]],
) -> None:
    stack, template = sharded
    shard, averager = stack.rounds.shard, stack.rounds.averager
    assert shard is not None
    shard_props = resource_json(template, shard)["Properties"]
    averager_props = resource_json(template, averager)["Properties"]
    assert shard_props["ImageConfig"]["Command"] == [SHARD_HANDLER]
    assert shard_props["Code"] == averager_props["Code"]  # one image asset
    env = averager_props["Environment"]["Variables"]
    assert env[SHARD_FUNCTION_ENV] == {"Ref": logical_id(shard)}


def test_only_the_averager_may_invoke_the_shard_function(
    sharded: tuple[Any, dict[str, Any]],
) -> None:
    stack, template = sharded
    shard_arn = {"Fn::GetAtt": [logical_id(stack.rounds.shard), "Arn"]}
    invokers: set[str] = set()
    for resource in template["Resources"].values():
        if resource["Type"] != "AWS::IAM::Policy":
            continue
        for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
            if "lambda:InvokeFunction" in actions_of(statement) and shard_arn in resources_of(
                statement
            ):
                invokers.update(r["Ref"] for r in resource["Properties"]["Roles"])
    assert invokers == {logical_id(stack.rounds.averager.role)}
    # The shard's role: no Lambda, no DynamoDB; writes only partial sums, once.
    statements = _statements(template, logical_id(stack.rounds.shard.role))
    actions = {a for s in statements for a in actions_of(s)}
    assert not any(a.startswith(("lambda:", "dynamodb:")) for a in actions)
    puts = [s for s in statements if "s3:PutObject" in actions_of(s)]
    assert len(puts) == 1 and puts[0]["Condition"] == {"StringEquals": {"s3:if-none-match": "*"}}
    assert all("partials/*" in json.dumps(r) for r in resources_of(puts[0]))


def test_without_sharding_configured_there_is_no_shard_function(synthesized: Any) -> None:
    assert synthesized.stack.rounds.shard is None
    assert not any("Shard" in logical for logical in synthesized.resources("AWS::Lambda::Function"))


def test_the_shard_function_traces_and_has_its_own_throttle_alarm(
    sharded: tuple[Any, dict[str, Any]],
) -> None:
    stack, template = sharded
    shard = stack.rounds.shard
    assert resource_json(template, shard)["Properties"]["TracingConfig"] == {"Mode": "Active"}
    throttles = [
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"]["MetricName"] == "Throttles"
    ]
    dimensions = [d["Value"] for a in throttles for d in a["Dimensions"]]
    assert {"Ref": logical_id(shard)} in dimensions and len(throttles) == 3


def test_the_shard_function_may_decrypt_the_updates_it_sums(
    sharded: tuple[Any, dict[str, Any]],
) -> None:
    """It reads its shard's updates: the updates key's policy names its role beside the
    averager's, for kms:Decrypt through S3 only."""
    stack, template = sharded
    key = resource_json(template, stack.storage.updates_key)["Properties"]["KeyPolicy"]
    decrypting = {
        s["Principal"]["AWS"]["Fn::GetAtt"][0]: s["Condition"]
        for s in key["Statement"]
        if s["Action"] == "kms:Decrypt"
    }
    assert set(decrypting) == {
        logical_id(stack.rounds.averager.role),
        logical_id(stack.rounds.shard.role),
    }
    assert all(set(c["StringEquals"]) == {"kms:ViaService"} for c in decrypting.values())
