"""A device reads only what the edge client needs from the models bucket, proven from the
synthesized template: its policies (resolved with each bucket named by its logical id) are
evaluated by the project's IAM proof (``iam_proof.Policies``) against the requests a device
could make. The deployed proof (``test_least_privilege``) shows the client needs no more."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from iam_proof import Policies, Request
from stack_template import Synthesized

from sfl.core import layout

THING = {"credentials-iot:ThingName": "device-a"}
PSEUDO = {"AWS::Partition": "aws", "AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012"}


def _resolve(value: Any) -> Any:
    """The template's intrinsics as plain strings: a bucket's ARN names its logical id."""
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if not isinstance(value, Mapping):
        return value
    if "Fn::GetAtt" in value:
        logical, attribute = value["Fn::GetAtt"]
        return f"arn:aws:s3:::{logical}" if attribute == "Arn" else f"{logical}.{attribute}"
    if "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(str(_resolve(p)) for p in parts)
    if "Fn::Sub" in value:  # the CDK asset bucket's name
        text = str(value["Fn::Sub"])
        for name, given in PSEUDO.items():
            text = text.replace("${" + name + "}", given)
        return text
    if "Ref" in value:
        return PSEUDO.get(value["Ref"], value["Ref"])
    return {k: _resolve(v) for k, v in value.items()}


@pytest.fixture(scope="module")
def device(synthesized: Synthesized) -> tuple[Policies, str]:
    role = synthesized.logical_id(synthesized.stack.edge.device_role)
    documents = {
        logical: _resolve(resource["Properties"]["PolicyDocument"])
        for logical, resource in synthesized.template_json["Resources"].items()
        if resource["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}
        and {"Ref": role} in resource["Properties"].get("Roles", [])
    }
    models = synthesized.logical_id(synthesized.stack.storage.models_bucket)
    return Policies(documents), f"arn:aws:s3:::{models}"


def _get(bucket: str, key: str) -> Request:
    return Request("s3:GetObject", f"{bucket}/{key}")


def test_a_device_may_read_the_assignment_and_the_model_versions(device):
    policies, models = device
    for key in (layout.ASSIGNMENT_KEY, layout.model_key(0), layout.model_key(123456)):
        assert policies.allows(_get(models, key), THING), key
    assert policies.allows(_get(models, layout.PROMOTED_MODEL_KEY), THING)  # for inference


def test_a_device_may_not_read_lineage_state_or_anything_else(device):
    policies, models = device
    for key in (
        layout.lineage_key(1),  # every round's participants and held-out accuracy
        layout.lineage_key(0),
        layout.state_key(1),
        layout.EVAL_DATA_KEY,
        f"{layout.PARTIALS_PREFIX}round-000001/shard-0000.safetensors",
        f"{layout.MODELS_PREFIX}v000001.safetensors.json",
        f"{layout.MODELS_PREFIX}notes.txt",
    ):
        assert not policies.allows(_get(models, key), THING), key


def test_a_device_may_not_list_the_models_bucket(device):
    policies, models = device
    for prefix in ("", layout.MODELS_PREFIX, layout.ASSIGNMENT_KEY, layout.STATE_PREFIX):
        listing = Request("s3:ListBucket", models, {"s3:prefix": (prefix,)})
        assert not policies.allows(listing, THING), prefix
    assert not policies.allows(Request("s3:ListBucket", models), THING)
