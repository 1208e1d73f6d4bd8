"""cdk-nag's AwsSolutions pack: no unacknowledged finding, each acknowledgement reasoned."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk import App, Stack, Validations
from aws_cdk import aws_s3 as s3
from cdk_nag import AwsSolutionsChecks
from stack_template import Synthesized, logical_id

# Every acknowledged finding, by resource. A new finding fails synthesis; a new
# acknowledgement fails here until it is reviewed and listed.
EXPECTED = {
    "AccessLogsBucket": {"AwsSolutions-S1"},
    "FailedInvocations": {"AwsSolutions-SQS3"},
    "AlarmTopic": {"AwsSolutions-SNS2"},
    "InitiatorRole": {
        "AwsSolutions-IAM5[Resource::<{models}.Arn>/models/global/*]",
        "AwsSolutions-IAM5[Resource::*]",  # X-Ray's writes take no other resource
    },
    "AveragerRole": {
        "AwsSolutions-IAM5[Resource::*]",
        "AwsSolutions-IAM5[Resource::<{models}.Arn>/models/global/*]",
        "AwsSolutions-IAM5[Resource::<{models}.Arn>/state/*]",
        "AwsSolutions-IAM5[Resource::<{updates}.Arn>/updates/*]",
    },
    "TokenExchangeRole": {
        "AwsSolutions-IAM5[Resource::<{models}.Arn>/models/global/v*.safetensors]",
        "AwsSolutions-IAM5[Resource::<{updates}.Arn>/updates/<credentials-iot:ThingName>/"
        "round-*.safetensors]",
    },
    "DestroyCleanupRole": {
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:"
        f"{kind}/*]"
        for kind in ("cert", "thinggroup")
    },
    "BucketNotificationsHandler": {
        "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
        "AWSLambdaBasicExecutionRole]"
    },
}


def acknowledgements(template_json: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    return {
        logical: resource["Metadata"]["cdk_nag"]["rules_to_suppress"]
        for logical, resource in template_json["Resources"].items()
        if "cdk_nag" in resource.get("Metadata", {})
    }


def test_synthesis_reports_no_unacknowledged_finding(synthesized: Synthesized):
    report = json.loads((synthesized.assembly_dir / "validation-report.json").read_text())
    violations = [v for plugin in report["pluginReports"] for v in plugin.get("violations", [])]
    assert violations == []


def test_exactly_the_reviewed_findings_are_acknowledged(synthesized: Synthesized):
    storage = synthesized.stack.storage
    names = {
        "models": logical_id(storage.models_bucket),
        "updates": logical_id(storage.updates_bucket),
    }
    found: dict[str, set[str]] = {}
    for logical, rules in acknowledgements(synthesized.template_json).items():
        owner = next((key for key in EXPECTED if key in logical), logical)
        found.setdefault(owner, set()).update(rule["id"] for rule in rules)
    assert found == {
        owner: {rule.format(**names) for rule in rules} for owner, rules in EXPECTED.items()
    }


def test_every_acknowledgement_gives_a_specific_reason(synthesized: Synthesized):
    reasons = [
        rule["reason"]
        for rules in acknowledgements(synthesized.template_json).values()
        for rule in rules
    ]
    assert reasons
    for reason in reasons:
        assert len(reason) >= 60, reason


def test_the_pack_does_fail_synthesis_on_a_finding(tmp_path):
    app = App(outdir=str(tmp_path))
    stack = Stack(app, "Careless")
    s3.Bucket(stack, "Bucket")  # no TLS-only policy, no access logs
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    report = json.loads((tmp_path / "validation-report.json").read_text())
    rules = {v["ruleName"] for p in report["pluginReports"] for v in p["violations"]}
    assert {"AwsSolutions-S1", "AwsSolutions-S10"} <= rules
