"""The buckets: private, SSL-only, encrypted, logged; models versioned; updates expire, under a
key of their own that the account administers and nobody uses until the stack says who."""

from __future__ import annotations

from typing import Any

import pytest
from aws_cdk import Stack, assertions
from stack_template import logical_id, resource_json

from infra.storage import KEY_ADMINISTRATION, KEY_PENDING_WINDOW_DAYS, FederationStorage
from sfl.core import layout

MAX_UPDATE_BYTES = 3 * 1024 * 1024


def build(stack: Stack, *, retain_data: bool = False) -> FederationStorage:
    return FederationStorage(
        stack,
        "Storage",
        update_expiry_days=7,
        max_update_bytes=MAX_UPDATE_BYTES,
        log_retention_days=90,
        retain_data=retain_data,
    )


@pytest.fixture
def storage(bare_stack: Stack) -> tuple[FederationStorage, assertions.Template, dict[str, Any]]:
    construct = build(bare_stack)
    template = assertions.Template.from_stack(bare_stack)
    return construct, template, template.to_json()


def test_three_buckets_all_block_public_access_and_encrypt(storage):
    _, template, _ = storage
    template.resource_count_is("AWS::S3::Bucket", 3)
    buckets = template.find_resources("AWS::S3::Bucket")
    for bucket in buckets.values():
        props = bucket["Properties"]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        assert props["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    construct = storage[0]
    for bucket in (construct.logs_bucket, construct.models_bucket):
        assert resource_json(storage[2], bucket)["Properties"]["BucketEncryption"] == {
            "ServerSideEncryptionConfiguration": [
                {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
            ]
        }


def test_updates_are_encrypted_with_their_own_rotated_key_and_a_bucket_key(storage):
    construct, template, template_json = storage
    template.resource_count_is("AWS::KMS::Key", 1)
    key = logical_id(construct.updates_key)
    updates = resource_json(template_json, construct.updates_bucket)["Properties"]
    assert updates["BucketEncryption"] == {
        "ServerSideEncryptionConfiguration": [
            {
                "BucketKeyEnabled": True,  # S3 asks KMS per bucket key, not per object
                "ServerSideEncryptionByDefault": {
                    "KMSMasterKeyID": {"Fn::GetAtt": [key, "Arn"]},
                    "SSEAlgorithm": "aws:kms",
                },
            }
        ]
    }
    props = template_json["Resources"][key]["Properties"]
    assert props["EnableKeyRotation"] is True
    assert props["PendingWindowInDays"] == KEY_PENDING_WINDOW_DAYS == 7  # KMS's shortest


def test_the_account_administers_the_updates_key_but_may_not_use_it(storage):
    """The key's own policy as the construct makes it: one statement, for the account,
    naming no cryptographic operation and no CreateGrant. So no IAM policy in the account
    can let anyone decrypt an update; the stack adds who may (infra.stack)."""
    construct, _, template_json = storage
    policy = template_json["Resources"][logical_id(construct.updates_key)]["Properties"]
    (statement,) = policy["KeyPolicy"]["Statement"]
    assert statement["Principal"]["AWS"]["Fn::Join"][1][-1] == ":root"
    assert sorted(statement["Action"]) == sorted(KEY_ADMINISTRATION)
    using = {"kms:Decrypt", "kms:Encrypt", "kms:CreateGrant", "kms:ReEncryptFrom", "kms:*"}
    assert not using & set(statement["Action"])
    assert not [a for a in statement["Action"] if "*" in a or a.startswith("kms:GenerateDataKey")]


def test_every_bucket_policy_denies_requests_without_tls(storage):
    construct, template, _ = storage
    policies = template.find_resources("AWS::S3::BucketPolicy")
    assert len(policies) == 3
    for bucket in (construct.logs_bucket, construct.models_bucket, construct.updates_bucket):
        bucket_ref = Stack.of(bucket).resolve(bucket.bucket_name)
        template.has_resource_properties(
            "AWS::S3::BucketPolicy",
            {
                "Bucket": bucket_ref,
                "PolicyDocument": {
                    "Statement": assertions.Match.array_with(
                        [
                            assertions.Match.object_like(
                                {
                                    "Effect": "Deny",
                                    "Action": "s3:*",
                                    "Principal": {"AWS": "*"},
                                    "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                                }
                            ),
                            assertions.Match.object_like(
                                {
                                    "Effect": "Deny",
                                    "Action": "s3:*",
                                    "Condition": {"NumericLessThan": {"s3:TlsVersion": 1.2}},
                                }
                            ),
                        ]
                    )
                },
            },
        )


def test_models_bucket_keeps_every_version(storage):
    construct, _, template_json = storage
    models = resource_json(template_json, construct.models_bucket)["Properties"]
    assert models["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = {rule["Id"]: rule for rule in models["LifecycleConfiguration"]["Rules"]}
    # Nothing ever expires a model; only old versions of the assignment object and the
    # partial sums of sharded rounds go.
    partials = rules.pop("ExpirePartialSums")
    assert partials["Prefix"] == layout.PARTIALS_PREFIX
    assert partials["ExpirationInDays"] == 1
    assert partials["NoncurrentVersionExpiration"] == {"NoncurrentDays": 1}
    assert not layout.model_key(3).startswith(partials["Prefix"])
    assert not layout.ASSIGNMENT_KEY.startswith(partials["Prefix"])
    assert all("ExpirationInDays" not in rule for rule in rules.values())
    assert rules["ExpireOldAssignments"]["Prefix"] == "rounds/"
    assert layout.ASSIGNMENT_KEY.startswith(rules["ExpireOldAssignments"]["Prefix"])
    assert rules["ExpireOldAssignments"]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 7}


def test_updates_bucket_expires_updates_after_the_configured_days(storage):
    construct, _, template_json = storage
    updates = resource_json(template_json, construct.updates_bucket)["Properties"]
    assert "VersioningConfiguration" not in updates
    rules = {rule["Id"]: rule for rule in updates["LifecycleConfiguration"]["Rules"]}
    assert rules["ExpireOldUpdates"] == {
        "Id": "ExpireOldUpdates",
        "Prefix": layout.UPDATES_PREFIX,
        "ExpirationInDays": 7,
        "Status": "Enabled",
    }
    assert rules["AbortIncompleteUploads"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 1
    }


def test_an_upload_larger_than_any_update_expires_after_a_day(storage):
    """IAM cannot cap a PutObject's size; S3's lifecycle can remove what is larger than the
    largest update the averager accepts, after its shortest expiry (a day)."""
    construct, _, template_json = storage
    updates = resource_json(template_json, construct.updates_bucket)["Properties"]
    rules = {rule["Id"]: rule for rule in updates["LifecycleConfiguration"]["Rules"]}
    assert rules["ExpireOversizedUploads"] == {
        "Id": "ExpireOversizedUploads",
        "Prefix": layout.UPDATES_PREFIX,
        "ObjectSizeGreaterThan": str(MAX_UPDATE_BYTES),  # CloudFormation types it a string
        "ExpirationInDays": 1,
        "Status": "Enabled",
    }


def test_models_and_updates_log_access_to_the_logs_bucket(storage):
    construct, _, template_json = storage
    stack = Stack.of(construct)
    logs_ref = stack.resolve(construct.logs_bucket.bucket_name)
    for bucket, prefix in (
        (construct.models_bucket, "ModelsBucket/"),
        (construct.updates_bucket, "UpdatesBucket/"),
    ):
        assert resource_json(template_json, bucket)["Properties"]["LoggingConfiguration"] == {
            "DestinationBucketName": logs_ref,
            "LogFilePrefix": prefix,
        }
    logs = resource_json(template_json, construct.logs_bucket)["Properties"]
    assert "LoggingConfiguration" not in logs
    assert logs["LifecycleConfiguration"]["Rules"][0]["ExpirationInDays"] == 90


def test_destroy_removes_buckets_and_their_objects_by_default(storage):
    """And schedules the updates key's deletion: KMS deletes a key only after a waiting
    period (7 days here), during which it can be used by nobody (docs/deploy.md, Destroy)."""
    _, template, _ = storage
    for bucket in template.find_resources("AWS::S3::Bucket").values():
        assert bucket["DeletionPolicy"] == "Delete"
        assert bucket["UpdateReplacePolicy"] == "Delete"
    template.resource_count_is("Custom::S3AutoDeleteObjects", 3)
    (key,) = template.find_resources("AWS::KMS::Key").values()
    assert key["DeletionPolicy"] == "Delete" and key["UpdateReplacePolicy"] == "Delete"


def test_retain_flag_keeps_buckets_and_objects(bare_stack):
    """And the updates key: a retained bucket without it could never be read again."""
    build(bare_stack, retain_data=True)
    template = assertions.Template.from_stack(bare_stack)
    for bucket in template.find_resources("AWS::S3::Bucket").values():
        assert bucket["DeletionPolicy"] == "Retain"
    template.resource_count_is("Custom::S3AutoDeleteObjects", 0)
    (key,) = template.find_resources("AWS::KMS::Key").values()
    assert key["DeletionPolicy"] == "Retain"


def test_retained_buckets_keep_their_policies(bare_stack):
    """SSL-only and log delivery stay with the data: a retained bucket without its policy
    would accept plain HTTP and stop receiving access logs."""
    build(bare_stack, retain_data=True)
    template = assertions.Template.from_stack(bare_stack)
    policies = template.find_resources("AWS::S3::BucketPolicy")
    assert len(policies) == 3
    for policy in policies.values():
        assert policy["DeletionPolicy"] == "Retain"
        assert policy["UpdateReplacePolicy"] == "Retain"
