"""checkov (in its own virtualenv): no failed check; every skip sits on its resource, reasoned."""

from __future__ import annotations

import os
import subprocess

import pytest
from stack_template import REPO_ROOT, Synthesized

# check id -> resource types it may be skipped on. A new skip fails here until reviewed.
EXPECTED_SKIPS = {
    "CKV_AWS_18": {"AWS::S3::Bucket"},  # the access-log bucket itself
    "CKV_AWS_21": {"AWS::S3::Bucket"},  # updates and access logs are write-once
    "CKV_AWS_26": {"AWS::SNS::Topic"},  # CloudWatch cannot publish to an aws/sns-encrypted topic
    "CKV_AWS_27": {"AWS::SQS::Queue"},  # SSE-SQS rather than a paid KMS key
    "CKV_AWS_115": {"AWS::Lambda::Function"},  # reserved concurrency off by default
    "CKV_AWS_116": {"AWS::Lambda::Function"},  # on-failure destinations, not a DLQ
    "CKV_AWS_117": {"AWS::Lambda::Function"},  # no VPC to reach
    "CKV_AWS_119": {"AWS::DynamoDB::Table"},  # AWS-managed key
    "CKV_AWS_158": {"AWS::Logs::LogGroup"},  # default CloudWatch Logs encryption
    "CKV_AWS_173": {"AWS::Lambda::Function"},  # no secrets in the environment
}


def skips(synthesized: Synthesized) -> list[tuple[str, str, dict[str, str]]]:
    return [
        (logical, resource["Type"], skip)
        for logical, resource in synthesized.template_json["Resources"].items()
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", [])
    ]


def test_every_skip_is_expected_and_justified(synthesized: Synthesized):
    found: dict[str, set[str]] = {}
    for logical, resource_type, skip in skips(synthesized):
        found.setdefault(skip["id"], set()).add(resource_type)
        assert len(skip["comment"]) >= 60, (logical, skip)
    assert found == EXPECTED_SKIPS


def test_our_own_resources_skip_only_what_their_code_explains(synthesized: Synthesized):
    bucket_skips = {
        logical: frozenset(s["id"] for s in resource["Metadata"]["checkov"]["skip"])
        for logical, resource in synthesized.resources("AWS::S3::Bucket").items()
        if "checkov" in resource.get("Metadata", {})
    }
    models = synthesized.logical_id(synthesized.stack.storage.models_bucket)
    assert models not in bucket_skips  # the models bucket passes every bucket check
    assert set(bucket_skips.values()) == {
        frozenset({"CKV_AWS_18", "CKV_AWS_21"}),
        frozenset({"CKV_AWS_21"}),
    }


@pytest.mark.slow
def test_checkov_passes_the_synthesized_template(synthesized: Synthesized):
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "checkov.sh"), str(synthesized.template_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Failed checks: 0" in result.stdout
