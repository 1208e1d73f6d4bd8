"""The least-privilege proof's own parts, on tiny cases: which IAM requests a call makes, and
how Allow statements evaluate (IAM's documented rules for the operators the stack uses)."""

from __future__ import annotations

import pytest
from iam_proof import Account, Call, KeyPolicy, Policies, Request, requests_for

ACCOUNT = Account("aws", "eu-west-1", "111122223333", {"clients": "client_id"})
TABLE = "arn:aws:dynamodb:eu-west-1:111122223333:table/clients"


def call(service: str, operation: str, params: dict, status: int = 200, error: str = "") -> Call:
    return Call("someone", service, operation, params, status, error)


def test_a_missing_object_needs_list_bucket_to_answer_404():
    found = call("s3", "HeadObject", {"Bucket": "b", "Key": "k"})
    missing = call("s3", "HeadObject", {"Bucket": "b", "Key": "k"}, status=404, error="404")
    assert [r.action for r in requests_for(found, ACCOUNT)] == ["s3:GetObject"]
    assert [(r.action, r.resource) for r in requests_for(missing, ACCOUNT)] == [
        ("s3:GetObject", "arn:aws:s3:::b/k"),
        ("s3:ListBucket", "arn:aws:s3:::b"),
    ]


def test_a_conditional_put_carries_if_none_match():
    (put,) = requests_for(
        call("s3", "PutObject", {"Bucket": "b", "Key": "k", "IfNoneMatch": "*"}), ACCOUNT
    )
    assert put.context == {"s3:if-none-match": ("*",)}


def test_a_transaction_is_authorised_item_by_item():
    items = [
        {"Put": {"TableName": "rounds", "Item": {"experiment": {"S": "e"}}}},
        {"ConditionCheck": {"TableName": "rounds", "Key": {"experiment": {"S": "e"}}}},
    ]
    requests = requests_for(
        call("dynamodb", "TransactWriteItems", {"TransactItems": items}), ACCOUNT
    )
    assert [r.action for r in requests] == ["dynamodb:PutItem", "dynamodb:ConditionCheckItem"]


def test_a_batch_write_is_authorised_per_table_with_every_leading_key():
    writes = [
        {"PutRequest": {"Item": {"client_id": {"S": k}, "n": {"N": "1"}}}} for k in ("b", "a", "b")
    ]
    (batch,) = requests_for(
        call("dynamodb", "BatchWriteItem", {"RequestItems": {"clients": writes}}), ACCOUNT
    )
    assert (batch.action, batch.resource) == ("dynamodb:BatchWriteItem", TABLE)
    assert batch.context == {"dynamodb:LeadingKeys": ("a", "b")}


def test_an_update_names_its_leading_key_and_every_top_level_attribute_it_touches():
    params = {
        "TableName": "clients",
        "Key": {"client_id": {"S": "dev-1"}},
        "UpdateExpression": "SET last_seen = :now, #s.inner = :x ADD answers :one",
        "ConditionExpression": "attribute_exists(client_id)",
        "ExpressionAttributeNames": {"#s": "stats"},
    }
    (update,) = requests_for(call("dynamodb", "UpdateItem", params), ACCOUNT)
    assert update.context["dynamodb:LeadingKeys"] == ("dev-1",)
    assert update.context["dynamodb:Attributes"] == ("answers", "client_id", "last_seen", "stats")


def test_an_unknown_operation_is_an_error_not_a_pass():
    with pytest.raises(LookupError, match="sqs:DeleteQueue"):
        requests_for(call("sqs", "DeleteQueue", {"QueueUrl": "q"}), ACCOUNT)


def policies(statement: dict) -> Policies:
    return Policies({"p": {"Version": "2012-10-17", "Statement": [statement]}})


def test_resource_wildcards_and_policy_variables():
    own = policies(
        {"Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::u/up/${t}/*"}
    )
    mine = Request("s3:PutObject", "arn:aws:s3:::u/up/dev-1/round-1")
    assert own.allows(mine, {"t": "dev-1"})
    assert not own.allows(mine, {"t": "dev-2"})


def test_for_all_values_holds_for_a_missing_key_and_if_exists_too():
    statement = {
        "Effect": "Allow",
        "Action": "dynamodb:UpdateItem",
        "Resource": TABLE,
        "Condition": {
            "ForAllValues:StringEquals": {"dynamodb:Attributes": ["client_id", "last_seen"]},
            "StringEqualsIfExists": {"dynamodb:ReturnValues": ["NONE"]},
        },
    }
    grant = policies(statement)
    assert grant.allows(Request("dynamodb:UpdateItem", TABLE), {})
    allowed = {"dynamodb:Attributes": ("client_id", "last_seen")}
    assert grant.allows(Request("dynamodb:UpdateItem", TABLE, allowed), {})
    extra = {"dynamodb:Attributes": ("client_id", "ewma")}
    assert not grant.allows(Request("dynamodb:UpdateItem", TABLE, extra), {})
    all_new = {**allowed, "dynamodb:ReturnValues": ("ALL_NEW",)}
    assert not grant.allows(Request("dynamodb:UpdateItem", TABLE, all_new), {})


def test_a_plain_condition_fails_without_its_key():
    conditional = policies(
        {
            "Effect": "Allow",
            "Action": "s3:PutObject",
            "Resource": "arn:aws:s3:::m/*",
            "Condition": {"StringEquals": {"s3:if-none-match": "*"}},
        }
    )
    assert not conditional.allows(Request("s3:PutObject", "arn:aws:s3:::m/k"), {})
    assert conditional.allows(
        Request("s3:PutObject", "arn:aws:s3:::m/k", {"s3:if-none-match": ("*",)}), {}
    )


def test_an_unused_grant_is_reported():
    two = Policies(
        {
            "p": {
                "Statement": [
                    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "*"}
                ]
            }
        }
    )
    used = [(Request("s3:GetObject", "arn:aws:s3:::b/k"), {})]
    assert [g.action for g in two.unused(used)] == ["s3:PutObject"]


def test_versions_and_indexes_are_resources_of_their_own():
    (version,) = requests_for(
        call("s3", "GetObject", {"Bucket": "b", "Key": "k", "VersionId": "v1"}), ACCOUNT
    )
    assert version.action == "s3:GetObjectVersion"
    (query,) = requests_for(
        call("dynamodb", "Query", {"TableName": "clients", "IndexName": "by_seen"}), ACCOUNT
    )
    assert query.resource == f"{TABLE}/index/by_seen"


def test_a_device_upload_must_be_readable_by_the_averager():
    """The device's PutObject grant as the stack writes it: a plain upload passes; an archive
    storage class or a customer-provided key (which the averager could not read) does not."""
    device = policies(
        {
            "Effect": "Allow",
            "Action": "s3:PutObject",
            "Resource": "arn:aws:s3:::u/updates/${credentials-iot:ThingName}/round-*.safetensors",
            "Condition": {
                "StringEqualsIfExists": {"s3:x-amz-storage-class": "STANDARD"},
                "Null": {"s3:x-amz-server-side-encryption-customer-algorithm": "true"},
            },
        }
    )
    me = {"credentials-iot:ThingName": "dev-1"}

    def put(key: str, **params: str) -> Request:
        params = {"Bucket": "u", "Key": key, **params}
        (request,) = requests_for(call("s3", "PutObject", params), ACCOUNT)
        return request

    own = "updates/dev-1/round-000001.safetensors"
    assert device.allows(put(own), me)
    assert device.allows(put(own, StorageClass="STANDARD"), me)
    assert not device.allows(put(own, StorageClass="GLACIER"), me)
    assert not device.allows(put(own, SSECustomerAlgorithm="AES256"), me)
    assert not device.allows(put("updates/dev-1/junk.bin"), me)
    assert not device.allows(put("updates/dev-10/round-000001.safetensors"), me)


def test_the_clean_up_may_detach_any_policy_but_the_stacks_own_from_the_role():
    """The destroy clean-up's DetachRolePolicy grant as the stack writes it (ArnNotEquals on
    iam:PolicyARN): a foreign policy's attachment passes, the stack's own does not."""
    role = "arn:aws:iam::111122223333:role/device-role"
    own = "arn:aws:iam::111122223333:policy/device-roleAccess"
    grant = policies(
        {
            "Effect": "Allow",
            "Action": "iam:DetachRolePolicy",
            "Resource": role,
            "Condition": {"ArnNotEquals": {"iam:PolicyARN": [own]}},
        }
    )

    def detach(policy_arn: str) -> Request:
        params = {"RoleName": "device-role", "PolicyArn": policy_arn}
        (request,) = requests_for(call("iam", "DetachRolePolicy", params), ACCOUNT)
        return request

    assert detach(own).resource == role
    assert grant.allows(detach("arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy"), {})
    assert not grant.allows(detach(own), {})
    # Without the key a negated operator holds: the request's value matches none.
    assert grant.allows(Request("iam:DetachRolePolicy", role), {})


def test_an_iot_policy_is_detached_on_its_target_and_listed_on_itself():
    cert = "arn:aws:iot:eu-west-1:111122223333:cert/0a1b2c"
    (detach,) = requests_for(
        call("iot", "DetachPolicy", {"policyName": "p", "target": cert}), ACCOUNT
    )
    assert (detach.action, detach.resource) == ("iot:DetachPolicy", cert)
    (listing,) = requests_for(call("iot", "ListTargetsForPolicy", {"policyName": "p"}), ACCOUNT)
    assert listing.resource == "arn:aws:iot:eu-west-1:111122223333:policy/p"


def test_a_stack_is_read_by_its_arn():
    arn = (
        "arn:aws:cloudformation:eu-west-1:111122223333:stack/S/5e3f0a70-0000-11f0-9c3a-0a1b2c3d4e5f"
    )
    (read,) = requests_for(call("cloudformation", "DescribeStacks", {"StackName": arn}), ACCOUNT)
    assert (read.action, read.resource) == ("cloudformation:DescribeStacks", arn)
    with pytest.raises(LookupError, match="name its ARN"):
        requests_for(call("cloudformation", "DescribeStacks", {"StackName": "S"}), ACCOUNT)


KEYED = Account(
    "aws",
    "eu-west-1",
    "111122223333",
    {},
    bucket_keys={"updates": "arn:aws:kms:eu-west-1:111122223333:key/k1"},
)
VIA_S3 = {"kms:ViaService": ("s3.eu-west-1.amazonaws.com",)}


def test_an_sse_kms_bucket_s_put_needs_a_data_key_and_its_get_a_decrypt():
    """HeadObject reads metadata only; a failed GetObject decrypts nothing."""
    key = KEYED.bucket_keys["updates"]
    params = {"Bucket": "updates", "Key": "k"}
    put = requests_for(call("s3", "PutObject", params), KEYED)
    get = requests_for(call("s3", "GetObject", params), KEYED)
    head = requests_for(call("s3", "HeadObject", params), KEYED)
    failed = requests_for(call("s3", "GetObject", params, 412, "PreconditionFailed"), KEYED)
    assert [(r.action, r.resource, r.context) for r in put[1:]] == [
        ("kms:GenerateDataKey", key, VIA_S3)
    ]
    assert [(r.action, r.resource) for r in get[1:]] == [("kms:Decrypt", key)]
    assert [r.action for r in head] == [r.action for r in failed] == ["s3:GetObject"]
    other = requests_for(call("s3", "GetObject", {"Bucket": "models", "Key": "k"}), KEYED)
    assert [r.action for r in other] == ["s3:GetObject"]


def test_delete_objects_is_authorised_object_by_object_with_its_etag():
    objects = [{"Key": "a", "ETag": '"e1"'}, {"Key": "b"}]
    requests = requests_for(
        call("s3", "DeleteObjects", {"Bucket": "b", "Delete": {"Objects": objects}}), ACCOUNT
    )
    assert [(r.action, r.resource, dict(r.context)) for r in requests] == [
        ("s3:DeleteObject", "arn:aws:s3:::b/a", {"s3:if-match": ('"e1"',)}),
        ("s3:GetObject", "arn:aws:s3:::b/a", {}),
        ("s3:DeleteObject", "arn:aws:s3:::b/b", {}),
    ]


def test_a_key_policy_allows_the_principals_it_names_and_the_account_only_through_iam():
    """KMS: a statement naming the caller allows; one naming the account's root allows only
    what the caller's IAM policies allow too; nothing else does."""
    reader = "arn:aws:iam::111122223333:role/reader"
    operator = "arn:aws:iam::111122223333:role/operator"
    root = "arn:aws:iam::111122223333:root"
    key = KeyPolicy(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": reader},
                    "Action": "kms:Decrypt",
                    "Resource": "*",
                    "Condition": {"StringEquals": {"kms:ViaService": "s3.eu-west-1.amazonaws.com"}},
                },
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": root},
                    "Action": ["kms:DescribeKey"],
                    "Resource": "*",
                },
            ]
        }
    )
    everything = Policies(
        {"admin": {"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}}
    )
    arn = KEYED.bucket_keys["updates"]
    decrypt = Request("kms:Decrypt", arn, VIA_S3)
    assert key.allows(decrypt, reader)
    assert not key.allows(Request("kms:Decrypt", arn), reader)  # not through S3
    assert not key.allows(decrypt, operator, identity=everything)  # kms:* in IAM: not enough
    assert key.allows(Request("kms:DescribeKey", arn), operator, identity=everything)
    assert not key.allows(Request("kms:DescribeKey", arn), operator)  # and IAM must allow it
    assert key.principals("kms:Decrypt") == {reader}
    assert [g.action for g in key.unused(reader, [decrypt])] == []
    assert [g.action for g in key.unused(reader, [])] == ["kms:Decrypt"]
