"""The CloudWatch dashboard: one resource, a widget for each thing an operator watches, every
metric one the handlers (or Lambda) really publish, and its URL as a stack output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aws_cdk import Stack, assertions
from aws_cdk import aws_lambda as lambda_

from infra.dashboard import FederationDashboard
from sfl.server.runtime import METRICS_NAMESPACE

REPO_ROOT = Path(__file__).resolve().parents[2]


def dashboard_body(bare_stack: Stack) -> dict[str, Any]:
    code = lambda_.Code.from_inline("def handler(event, context): pass")
    functions = [
        lambda_.Function(
            bare_stack,
            name,
            runtime=lambda_.Runtime.PYTHON_3_12,
            handler="index.handler",
            code=code,
        )
        for name in ("Initiator", "Averager")
    ]
    FederationDashboard(
        bare_stack,
        "Monitoring",
        initiator=functions[0],
        averager=functions[1],
        region="eu-west-1",
    )
    template = assertions.Template.from_stack(bare_stack)
    template.resource_count_is("AWS::CloudWatch::Dashboard", 1)
    (dashboard,) = template.find_resources("AWS::CloudWatch::Dashboard").values()
    # The body is an Fn::Join of literal text and references (function names, alarm ARNs).
    parts = dashboard["Properties"]["DashboardBody"]["Fn::Join"][1]
    text = "".join(p if isinstance(p, str) else "REF" for p in parts)
    return dict(json.loads(text))


def test_the_dashboard_shows_what_an_operator_watches(bare_stack: Stack):
    body = dashboard_body(bare_stack)
    titles = {w["properties"].get("title") for w in body["widgets"]}
    assert {
        "Rounds closed and abandoned",
        "Round duration (s)",
        "Participants and active devices",
        "Rejections by reason",
        "Aggregation time (s)",
        "Bytes per round",
        "Global model accuracy (held-out set)",
        "Lambda errors and throttles",
    } <= titles
    text = json.dumps(body)
    for lambda_metric in ("Errors", "Throttles"):
        assert f'"AWS/Lambda", "{lambda_metric}"' in text
    assert "UpdatesRejectedByReason" in text and "SEARCH(" in text


def test_every_federation_metric_on_the_dashboard_is_published_by_a_handler(bare_stack: Stack):
    body = dashboard_body(bare_stack)
    names = set()
    for widget in body["widgets"]:
        for metric in widget["properties"].get("metrics", []):
            if metric and metric[0] == METRICS_NAMESPACE:
                names.add(metric[1])
    assert len(names) >= 12
    sources = (
        "".join(
            (REPO_ROOT / "lambdas" / f / "handler.py").read_text()
            for f in ("initiator", "averager")
        )
        + (REPO_ROOT / "sfl" / "server" / "runtime.py").read_text()
    )
    # Metric names are CamelCase string literals in the handlers (or sfl.server.runtime constants).
    published = set(re.findall(r'"([A-Z][A-Za-z]+)"', sources))
    assert names <= published, names - published


def test_the_stack_outputs_the_dashboard_url_and_alarm_names(synthesized):
    outputs = synthesized.template_json["Outputs"]
    url = json.dumps(outputs["DashboardUrl"]["Value"])
    assert "console.aws.amazon.com/cloudwatch" in url and "#dashboards:name=" in url
    (dashboard_id,) = synthesized.resources("AWS::CloudWatch::Dashboard")
    assert dashboard_id in url
    alarm_refs = outputs["AlarmNames"]["Value"]["Fn::Join"][1]
    alarms = synthesized.resources("AWS::CloudWatch::Alarm")
    assert sorted(ref["Ref"] for ref in alarm_refs) == sorted(alarms)
