"""What the deployed stack limits of a device's uploads (docs/deploy.md, floods and limits):
IAM cannot cap a PutObject's size, so the updates bucket expires anything larger than the
federation's largest update after a day, and the averager deletes a refused upload only by
naming its ETag."""

from __future__ import annotations

from stack_template import REPO_ROOT, Synthesized

from infra.config import StackConfig
from sfl.core import layout


def test_the_oversized_upload_rule_uses_the_federations_largest_update(synthesized: Synthesized):
    config = StackConfig.from_cdk_json(REPO_ROOT / "cdk.json")
    updates = synthesized.logical_id(synthesized.stack.storage.updates_bucket)
    rules = synthesized.template_json["Resources"][updates]["Properties"]["LifecycleConfiguration"]
    (oversized,) = [r for r in rules["Rules"] if r["Id"] == "ExpireOversizedUploads"]
    assert oversized["ObjectSizeGreaterThan"] == str(config.federation.max_update_bytes)
    assert oversized["Prefix"] == layout.UPDATES_PREFIX
    assert oversized["ExpirationInDays"] == 1


def test_the_averager_may_delete_an_update_only_with_if_match(synthesized: Synthesized):
    role = synthesized.logical_id(synthesized.stack.rounds.averager.role)
    deletes = [
        statement
        for resource in synthesized.resources("AWS::IAM::Policy").values()
        if {"Ref": role} in resource["Properties"]["Roles"]
        for statement in resource["Properties"]["PolicyDocument"]["Statement"]
        if "s3:DeleteObject"
        in (statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]])
    ]
    assert len(deletes) == 1
    assert deletes[0]["Condition"] == {"Null": {"s3:if-match": "false"}}
