"""Who can read a device's update, proven on the synthesized template.

S3 returns an object encrypted with SSE-KMS only to a caller KMS lets decrypt its data key
(S3 user guide, "Using server-side encryption with AWS KMS keys (SSE-KMS)": downloading needs
``kms:Decrypt`` on the key; AWS re:Post "s3-large-file-encryption-kms-key": a same-account
role needs the permission in the key policy). moto enforces neither IAM nor key policies, so
the proof is ``iam_proof``'s: the request a ``GetObject`` makes of S3 and of KMS, each judged
by the policies the template gives. An operator role written here, with S3 read access to the
whole account (as AWS's AmazonS3ReadOnlyAccess grants) or even every action, passes S3's check
and fails KMS's: the key's policy lets the account itself use the key for nothing.
"""

from __future__ import annotations

from typing import Any

from iam_proof import Account, Call, KeyPolicy, Policies, requests_for
from stack_template import Synthesized, logical_id

from sfl.core import layout

ACCOUNT_ID = "111122223333"
REGION = "eu-west-1"
PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::AccountId": ACCOUNT_ID,
    "AWS::Region": REGION,
    "AWS::URLSuffix": "amazonaws.com",
}


def resolve(template: dict[str, Any], value: Any) -> Any:
    """The intrinsics the stack's policies use, in an account of the test's: a resource's
    name is its logical ID."""
    if isinstance(value, dict) and len(value) == 1:
        ((name, arg),) = value.items()
        if name == "Ref":
            return PSEUDO.get(arg, arg)
        if name == "Fn::GetAtt" and arg[1] == "Arn":
            kind = template["Resources"][arg[0]]["Type"]
            return {
                "AWS::IAM::Role": f"arn:aws:iam::{ACCOUNT_ID}:role/{arg[0]}",
                "AWS::S3::Bucket": f"arn:aws:s3:::{arg[0]}",
                "AWS::KMS::Key": f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/{arg[0]}",
            }.get(kind, f"<{kind} {arg[0]}>")
        if name == "Fn::Join":
            return arg[0].join(str(resolve(template, part)) for part in arg[1])
    if isinstance(value, dict):
        return {k: resolve(template, v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(template, v) for v in value]
    return value


def role_policies(template: dict[str, Any], role: str) -> Policies:
    """A role's identity policies, as the template attaches them."""
    documents = {
        logical: resolve(template, r["Properties"]["PolicyDocument"])
        for logical, r in template["Resources"].items()
        if r["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}
        and {"Ref": role} in r["Properties"].get("Roles", [])
    }
    return Policies(documents)


def updates_key(synthesized: Synthesized) -> tuple[str, KeyPolicy]:
    template = synthesized.template_json
    key = logical_id(synthesized.stack.storage.updates_key)
    policy = template["Resources"][key]["Properties"]["KeyPolicy"]
    return resolve(template, {"Fn::GetAtt": [key, "Arn"]}), KeyPolicy(resolve(template, policy))


def get_update(synthesized: Synthesized, principal: str) -> list[Any]:
    """The IAM and KMS requests of a ``GetObject`` of a device's update."""
    bucket = logical_id(synthesized.stack.storage.updates_bucket)
    key_arn, _ = updates_key(synthesized)
    account = Account("aws", REGION, ACCOUNT_ID, {}, bucket_keys={bucket: key_arn})
    call = Call(
        principal,
        "s3",
        "GetObject",
        {"Bucket": bucket, "Key": layout.update_key("dev-a", 3)},
        200,
        "",
    )
    return requests_for(call, account)


def operator(actions: list[str]) -> Policies:
    return Policies(
        {"operator": {"Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}}
    )


def test_an_operator_role_s_get_object_on_an_update_fails(synthesized: Synthesized):
    """S3 read access to everything (AmazonS3ReadOnlyAccess's actions) or every action at all:
    S3 would serve the object, KMS refuses its data key."""
    s3_read, kms_request = get_update(synthesized, "operator")
    assert (s3_read.action, kms_request.action) == ("s3:GetObject", "kms:Decrypt")
    _, key = updates_key(synthesized)
    arn = f"arn:aws:iam::{ACCOUNT_ID}:role/OperatorRole"
    for policies in (operator(["s3:Get*", "s3:List*"]), operator(["*"])):
        assert policies.allows(s3_read, {})  # S3's own check passes ...
        assert not key.allows(kms_request, arn, identity=policies)  # ... KMS's fails


def test_the_averager_s_get_object_on_an_update_succeeds(synthesized: Synthesized):
    template = synthesized.template_json
    role = logical_id(synthesized.stack.rounds.averager.role)
    s3_read, kms_request = get_update(synthesized, "averager")
    _, key = updates_key(synthesized)
    assert role_policies(template, role).allows(s3_read, {})
    assert key.allows(kms_request, f"arn:aws:iam::{ACCOUNT_ID}:role/{role}")


def test_a_device_cannot_read_an_update_back_not_even_its_own(synthesized: Synthesized):
    template = synthesized.template_json
    role = logical_id(synthesized.stack.edge.device_role)
    _, kms_request = get_update(synthesized, "device")
    _, key = updates_key(synthesized)
    arn = f"arn:aws:iam::{ACCOUNT_ID}:role/{role}"
    assert not key.allows(kms_request, arn, identity=role_policies(template, role))


def test_no_identity_policy_of_the_stack_names_a_kms_action(synthesized: Synthesized):
    """Use of the updates key is written in one place, its policy; the account's statement
    there allows no use, so an identity policy could not add one anyway."""
    for logical, resource in synthesized.template_json["Resources"].items():
        if resource["Type"] not in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}:
            continue
        for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
            actions = statement["Action"]
            for action in actions if isinstance(actions, list) else [actions]:
                assert not action.startswith("kms:"), (logical, action)
    _, key = updates_key(synthesized)
    averager = logical_id(synthesized.stack.rounds.averager.role)
    assert key.principals("kms:Decrypt") == {f"arn:aws:iam::{ACCOUNT_ID}:role/{averager}"}
