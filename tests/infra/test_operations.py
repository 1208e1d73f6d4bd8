"""Operating the stack: every function traced to X-Ray, an alarm on each function's
throttles, and reserved concurrency the account can give (docs/deploy.md#tracing-throttles-
and-concurrency)."""

from __future__ import annotations

from typing import Any

import pytest
from stack_template import Synthesized, logical_id, resource_json

from infra.config import StackConfig
from sfl.core import cost
from sfl.core.config import ConfigError

XRAY_ACTIONS = ["xray:PutTelemetryRecords", "xray:PutTraceSegments"]


def _role_statements(template_json: dict[str, Any], role_logical_id: str) -> list[dict[str, Any]]:
    found = []
    for resource in template_json["Resources"].values():
        if (
            resource["Type"] == "AWS::IAM::Policy"
            and {"Ref": role_logical_id} in resource["Properties"]["Roles"]
        ):
            found.extend(resource["Properties"]["PolicyDocument"]["Statement"])
    return found


# --- tracing ---------------------------------------------------------------------------------


def test_both_functions_trace_actively(synthesized: Synthesized):
    rounds = synthesized.stack.rounds
    for function in (rounds.initiator, rounds.averager):
        props = resource_json(synthesized.template_json, function)["Properties"]
        assert props["TracingConfig"] == {"Mode": "Active"}


def test_the_only_wildcard_resources_a_function_role_holds_take_no_other(
    synthesized: Synthesized,
):
    """X-Ray's two write actions, and the initiator's iot:DescribeEndpoint (round notices),
    take no resource but "*" (IAM's Service Authorization Reference lists no resource type for
    them); nothing else rides on it."""
    rounds = synthesized.stack.rounds
    expected = {
        rounds.initiator: sorted(["iot:DescribeEndpoint", *XRAY_ACTIONS]),
        rounds.averager: XRAY_ACTIONS,
    }
    for function, actions in expected.items():
        statements = _role_statements(synthesized.template_json, logical_id(function.role))
        wildcard = [s for s in statements if s["Resource"] == "*"]
        assert wildcard == [{"Action": actions, "Effect": "Allow", "Resource": "*"}]


# --- throttle alarms -------------------------------------------------------------------------


def test_each_function_has_a_throttle_alarm_on_the_alarm_topic(synthesized: Synthesized):
    stack = synthesized.stack
    alarms = [
        a["Properties"]
        for a in synthesized.resources("AWS::CloudWatch::Alarm").values()
        if a["Properties"].get("MetricName") == "Throttles"
    ]
    throttled = sorted(
        d["Value"]["Ref"] for a in alarms for d in a["Dimensions"] if d["Name"] == "FunctionName"
    )
    functions = (stack.rounds.initiator, stack.rounds.averager)
    assert throttled == sorted(logical_id(f) for f in functions)
    topic = {"Ref": logical_id(stack.alarm_topic)}
    for alarm in alarms:
        assert alarm["Namespace"] == "AWS/Lambda" and alarm["Statistic"] == "Sum"
        assert alarm["Threshold"] == 1 and alarm["EvaluationPeriods"] == 1
        assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert alarm["TreatMissingData"] == "notBreaching"
        assert alarm["AlarmActions"] == [topic] and alarm["OKActions"] == [topic]


def test_the_cost_model_counts_the_stack_s_alarms(synthesized: Synthesized):
    """`sfl cost` prices the alarms the default stack creates (one count, checked here)."""
    assert len(synthesized.resources("AWS::CloudWatch::Alarm")) == cost.StackShape().alarms


# --- reserved concurrency --------------------------------------------------------------------


def _config(**infra: Any) -> StackConfig:
    context = {"sfl": {}, "sfl_infra": infra}
    return StackConfig.from_context(context.get)


def test_a_new_account_reserves_nothing():
    """10 concurrent executions in all: Lambda's unreserved minimum takes all of them."""
    assert _config(account_concurrency=10).infra.account_concurrency == 10
    for key in ("initiator_reserved_concurrency", "averager_reserved_concurrency"):
        with pytest.raises(
            ConfigError,
            match=r"initiator_reserved_concurrency \+ sfl_infra.averager_reserved_concurrency: "
            r"1 is not allowed; allowed: at most 0 \(sfl_infra.account_concurrency = 10",
        ):
            _config(account_concurrency=10, **{key: 1})


def test_an_account_of_1000_reserves_up_to_900_between_both_functions():
    assert _config(averager_reserved_concurrency=20, initiator_reserved_concurrency=1)
    assert _config(averager_reserved_concurrency=900).infra.averager_reserved_concurrency == 900
    with pytest.raises(ConfigError, match=r": 901 is not allowed; allowed: at most 900"):
        _config(averager_reserved_concurrency=900, initiator_reserved_concurrency=1)


def test_synthesis_refuses_a_reservation_the_account_cannot_give(tmp_path):
    from stack_template import cdk_context, synthesize

    context = cdk_context()
    context["sfl_infra"] = {
        **context["sfl_infra"],
        "account_concurrency": 50,
        "averager_reserved_concurrency": 10,
    }
    with pytest.raises(ConfigError, match=r"at most 0 \(sfl_infra.account_concurrency = 50"):
        synthesize(tmp_path, context)
