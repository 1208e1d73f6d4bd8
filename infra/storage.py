"""The buckets: global models (versioned), client updates (expiring, under a key of their own),
and their access logs."""

from __future__ import annotations

from typing import Any

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.compliance import acknowledge_nag, cfn_resource, skip_checkov
from sfl.core import layout
from sfl.core.resources import MODELS_BUCKET, UPDATES_BUCKET, BucketSpec

# What the account (so IAM policies in it, and CloudFormation) may do with the updates key:
# look after it, never use it. No cryptographic operation and no CreateGrant: only the key
# policy's own statements, which the stack adds for the roles that use it, let anyone encrypt
# or decrypt (docs/deploy.md, who can read an update). PutKeyPolicy is the break-glass path.
KEY_ADMINISTRATION = (
    "kms:DescribeKey",
    "kms:GetKeyPolicy",
    "kms:PutKeyPolicy",
    "kms:GetKeyRotationStatus",
    "kms:EnableKeyRotation",
    "kms:DisableKeyRotation",
    "kms:EnableKey",
    "kms:DisableKey",
    "kms:UpdateKeyDescription",
    "kms:ListResourceTags",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
)
# KMS deletes a key only after a waiting period of 7 to 30 days: the shortest.
KEY_PENDING_WINDOW_DAYS = 7


class FederationStorage(Construct):
    """Models bucket, updates bucket and access-logs bucket, all private, SSL-only, encrypted;
    the updates bucket with a customer-managed key (``updates_key``) whose policy the stack
    completes with who may encrypt and who may decrypt.

    Attributes: ``models_bucket``, ``updates_bucket``, ``updates_key``, ``logs_bucket``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        update_expiry_days: int,
        max_update_bytes: int,
        log_retention_days: int,
        retain_data: bool,
    ) -> None:
        super().__init__(scope, construct_id)
        self._retain = retain_data

        self.logs_bucket = s3.Bucket(
            self,
            "AccessLogsBucket",
            **self._common(),
            # Server access log delivery supports SSE-S3 only.
            encryption=s3.BucketEncryption.S3_MANAGED,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="ExpireAccessLogs", expiration=Duration.days(log_retention_days)
                )
            ],
        )
        acknowledge_nag(
            cfn_resource(self.logs_bucket),
            "AwsSolutions-S1",
            "This is the access-log destination of the other buckets; logging it into "
            "itself would log its own log deliveries.",
        )
        skip_checkov(
            self.logs_bucket,
            "CKV_AWS_18",
            "Access-log destination bucket; logging it into itself would log its own writes.",
        )
        skip_checkov(
            self.logs_bucket,
            "CKV_AWS_21",
            "Access logs are written once and expire; versioning would only keep deleted logs.",
        )

        self.models_bucket = self._bucket(
            MODELS_BUCKET,
            lifecycle_rules=[
                # The assignment is overwritten every round; its old versions are history
                # nobody reads. Model versions have their own keys and are all kept.
                s3.LifecycleRule(
                    id="ExpireOldAssignments",
                    prefix=layout.ASSIGNMENT_KEY.rsplit("/", 1)[0] + "/",
                    noncurrent_version_expiration=Duration.days(update_expiry_days),
                ),
                # A large round's partial sums (sfl.server.shards) are read once, by the reduce of
                # that round, within its aggregation lease; a day is ample.
                s3.LifecycleRule(
                    id="ExpirePartialSums",
                    prefix=layout.PARTIALS_PREFIX,
                    expiration=Duration.days(1),
                    noncurrent_version_expiration=Duration.days(1),
                ),
                s3.LifecycleRule(
                    id="AbortIncompleteUploads",
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                ),
            ],
        )
        updates_rules = [
            s3.LifecycleRule(
                id="ExpireOldUpdates",
                prefix=layout.UPDATES_PREFIX,
                expiration=Duration.days(update_expiry_days),
            ),
            # Nothing in IAM caps the size of a device's PutObject (up to 5 GB; no
            # condition key carries it). The averager refuses an upload above the bound
            # by its S3 event's size before reading a byte, and this rule removes it
            # after a day (S3's shortest expiry) instead of keeping it for the rest.
            s3.LifecycleRule(
                id="ExpireOversizedUploads",
                prefix=layout.UPDATES_PREFIX,
                object_size_greater_than=max_update_bytes,
                expiration=Duration.days(1),
            ),
            s3.LifecycleRule(
                id="AbortIncompleteUploads",
                abort_incomplete_multipart_upload_after=Duration.days(1),
            ),
        ]
        self.updates_key = self._updates_key()
        self.updates_bucket = self._bucket(
            UPDATES_BUCKET, lifecycle_rules=updates_rules, key=self.updates_key
        )
        # CloudFormation's schema types a rule's size as a string of digits; CDK renders a
        # number, which CloudFormation coerces and cfn-lint flags (W9003).
        oversized = [r.id for r in updates_rules].index("ExpireOversizedUploads")
        cfn_resource(self.updates_bucket).add_property_override(
            f"LifecycleConfiguration.Rules.{oversized}.ObjectSizeGreaterThan", str(max_update_bytes)
        )
        skip_checkov(
            self.updates_bucket,
            "CKV_AWS_21",
            "Updates are written once per client and round, never overwritten (the key names "
            "both), and expire by lifecycle; versioning would only keep expired updates.",
        )
        if retain_data:
            # A retained bucket keeps its policy (SSL-only, log delivery): otherwise destroy
            # would leave the data behind with neither.
            for bucket in (self.logs_bucket, self.models_bucket, self.updates_bucket):
                if bucket.policy is None:
                    raise ValueError(f"{bucket.node.path} has no bucket policy to retain")
                bucket.policy.apply_removal_policy(RemovalPolicy.RETAIN)

    def _common(self) -> dict[str, Any]:
        return {
            "block_public_access": s3.BlockPublicAccess.BLOCK_ALL,
            "enforce_ssl": True,
            "minimum_tls_version": 1.2,
            "removal_policy": RemovalPolicy.RETAIN if self._retain else RemovalPolicy.DESTROY,
            "auto_delete_objects": not self._retain,
        }

    def _updates_key(self) -> kms.Key:
        """The updates' key: rotated yearly, administered by the account, used by nobody
        until the stack names who (``infra.stack``). It goes with the stack unless data is
        retained (a retained bucket without its key could never be read again); KMS deletes
        it after the shortest waiting period, not at once."""
        return kms.Key(
            self,
            "UpdatesKey",
            description=f"{Stack.of(self).stack_name}: client updates (devices encrypt, the "
            "averager decrypts)",
            enable_key_rotation=True,
            pending_window=Duration.days(KEY_PENDING_WINDOW_DAYS),
            removal_policy=RemovalPolicy.RETAIN if self._retain else RemovalPolicy.DESTROY,
            policy=iam.PolicyDocument(
                statements=[
                    iam.PolicyStatement(
                        sid="AccountAdministersNeverUses",
                        principals=[iam.AccountRootPrincipal()],
                        actions=list(KEY_ADMINISTRATION),
                        resources=["*"],  # in a key policy: this key
                    )
                ]
            ),
        )

    def _bucket(
        self,
        spec: BucketSpec,
        *,
        lifecycle_rules: list[s3.LifecycleRule],
        key: kms.IKey | None = None,
    ) -> s3.Bucket:
        if spec.own_key != (key is not None):
            raise ValueError(f"{spec.logical_id}: own_key is {spec.own_key} (sfl.core.resources)")
        bucket = s3.Bucket(
            self,
            spec.logical_id,
            **self._common(),
            # Models: SSE-S3 (devices read them; nothing private). Updates: their own key,
            # with an S3 Bucket Key so S3 asks KMS for a data key about once per bucket key's
            # lifetime rather than once per object.
            encryption=s3.BucketEncryption.KMS if key else s3.BucketEncryption.S3_MANAGED,
            encryption_key=key,
            bucket_key_enabled=True if key else None,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            versioned=spec.versioned,
            server_access_logs_bucket=self.logs_bucket,
            server_access_logs_prefix=f"{spec.logical_id}/",
            lifecycle_rules=lifecycle_rules,
        )
        return bucket
