"""A device's update lives only until its round is finished: deleted once the version is written
and the round CLOSED (or ABANDONED), under a KMS key of the bucket's own until then, in local
mode as deployed. A retry after a crash still makes the same model, or closes with the one an
earlier attempt wrote."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
import torch
from botocore.exceptions import ClientError

from sfl.core import layout
from sfl.learning import codec
from sfl.local.lambdas import LocalFunction
from sfl.server import answers as judging
from sfl.server import transitions, update_disposal
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.server.notifications import s3_updates
from sfl.state.rounds import Answer, Outcome, RoundState, RoundStore
from tests.conftest import TINY_MODEL, Stack


def _scaled(factor: float) -> dict[str, torch.Tensor]:
    return {name: t * factor for name, t in TINY_MODEL.items()}


def _open_round(stack: Stack, *clients: str) -> RoundStore:
    stack.config = stack.config.replace(max_weight_ratio=3.0, norm_bound_factor=2.0)
    stack.put_model(0, TINY_MODEL)
    stack.register(*clients)
    assert start_round(stack.clients, stack.names, stack.config).started
    return RoundStore(stack.clients.dynamodb, stack.names.rounds_table)


def _updates(stack: Stack) -> list[str]:
    listed = stack.clients.s3.list_objects_v2(Bucket=stack.names.updates_bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _model(stack: Stack, version: int) -> dict[str, torch.Tensor]:
    body = stack.clients.s3.get_object(
        Bucket=stack.names.models_bucket, Key=layout.model_key(version)
    )["Body"].read()
    return codec.decode(body)


def test_local_mode_encrypts_updates_with_the_bucket_s_own_kms_key(stack: Stack) -> None:
    """As the stack deploys it: SSE-KMS by default, a customer-managed key, an S3 Bucket Key;
    an upload that names no encryption is stored under that key."""
    s3 = stack.clients.s3
    (rule,) = s3.get_bucket_encryption(Bucket=stack.names.updates_bucket)[
        "ServerSideEncryptionConfiguration"
    ]["Rules"]
    default = rule["ApplyServerSideEncryptionByDefault"]
    assert default["SSEAlgorithm"] == "aws:kms" and rule["BucketKeyEnabled"] is True
    key = stack.aws.client("kms").describe_key(KeyId=default["KMSMasterKeyID"])["KeyMetadata"]
    assert key["KeyManager"] == "CUSTOMER" and key["Arn"] == default["KMSMasterKeyID"]

    stack.upload_update("a", 1, _scaled(2.0))
    head = s3.head_object(Bucket=stack.names.updates_bucket, Key=layout.update_key("a", 1))
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == key["Arn"]


def test_a_closed_round_leaves_none_of_its_updates_and_the_right_model(stack: Stack) -> None:
    """Two accepted updates and a broken one (a rejected answer): once the round is CLOSED
    all three objects are gone, and version 1 is the weighted average of the two."""
    store = _open_round(stack, "a", "b", "c")
    averager = LocalFunction("averager")
    averager.invoke(stack.upload_update("a", 1, _scaled(2.0), num_examples=10))
    averager.invoke(stack.upload_update("b", 1, _scaled(2.5), num_examples=30))
    assert len(_updates(stack)) == 2  # kept while the round is open
    averager.invoke(stack.upload_update("c", 1, {}, body=b"not a safetensors file"))

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert round_.rejected and round_.model_version == 1
    assert _updates(stack) == []
    model = _model(stack, 1)
    # (10 * 2x + 30 * 2.5x) / 40 = 2.375x
    assert torch.allclose(model["w"], TINY_MODEL["w"] * 2.375)
    assert torch.allclose(model["b"], TINY_MODEL["b"] * 2.375)


def test_an_abandoned_round_leaves_none_of_its_updates(stack: Stack) -> None:
    """One of three answered by the hard deadline: no quorum, the round is abandoned."""
    store = _open_round(stack, "a", "b", "c")
    averager = Averager(stack.clients, stack.names, stack.config)
    event = stack.upload_update("a", 1, _scaled(2.0))
    LocalFunction("averager").invoke(event)
    opened = store.get("test", 1, slots=False)
    assert opened is not None and opened.status is RoundState.OPEN

    late = replace(averager.context, clock=lambda: opened.deadline_at + 1)
    finished = transitions.advance(late, opened)

    assert finished is not None and finished.status is RoundState.ABANDONED
    assert _updates(stack) == []


class _CrashBeforeClose(RoundStore):
    """A round store whose close never happens: the function died just before it."""

    def close(self, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("the function timed out before the close")


def test_a_crash_before_the_close_keeps_the_updates_and_the_retry_makes_the_same_model(
    stack: Stack,
) -> None:
    store = _open_round(stack, "a", "b")
    stack.config = stack.config.replace(aggregation_lease_seconds=30)
    averager = Averager(stack.clients, stack.names, stack.config)
    crashing = replace(
        averager.context, rounds=_CrashBeforeClose(stack.clients.dynamodb, stack.names.rounds_table)
    )
    (first,) = s3_updates(stack.upload_update("a", 1, _scaled(2.0)))
    (second,) = s3_updates(stack.upload_update("b", 1, _scaled(3.0)))
    judging.handle_update(crashing, first)

    with pytest.raises(RuntimeError, match="timed out"):
        judging.handle_update(crashing, second)  # the quorum: aggregates, then dies
    stuck = store.get("test", 1, slots=False)
    assert stuck is not None and stuck.status is RoundState.AGGREGATING
    written = _model(stack, 1)
    assert len(_updates(stack)) == 2  # nothing closed, so nothing deleted

    retry = replace(averager.context, clock=lambda: stuck.lease_expires_at + 1)
    finished = transitions.advance(retry, stuck)

    assert finished is not None and finished.status is RoundState.CLOSED
    assert finished.summary["model_already_written"] is True
    assert all(torch.equal(_model(stack, 1)[k], written[k]) for k in written)
    assert _updates(stack) == []


def test_a_retry_that_finds_the_updates_gone_closes_with_the_version_written(
    stack: Stack,
) -> None:
    """An earlier attempt wrote version 1 and stopped before the close; the updates are gone
    since. The round closes with version 1 (abandoning it would leave the next round a
    version it could never write)."""
    store = _open_round(stack, "a", "b")
    averager = Averager(stack.clients, stack.names, stack.config)
    for client in ("a", "b"):
        event = stack.upload_update(client, 1, _scaled(2.0))
        key = layout.update_key(client, 1)
        etag = event["Records"][0]["s3"]["object"]["eTag"]
        answer = Answer(Outcome.ACCEPTED, key, etag=etag, num_examples=10, delta_norm=1.0)
        assert store.record_answer("test", 1, client, answer).round is not None
    now = time.time()
    assert store.begin_aggregation("test", 1, "crashed", now, lease_seconds=30) is not None
    stack.put_model(1, _scaled(2.0))
    stack.clients.s3.delete_objects(
        Bucket=stack.names.updates_bucket,
        Delete={"Objects": [{"Key": k} for k in _updates(stack)]},
    )
    stuck = store.get("test", 1, slots=False)
    assert stuck is not None

    retry = replace(averager.context, clock=lambda: now + 31)
    finished = transitions.advance(retry, stuck)

    assert finished is not None and finished.status is RoundState.CLOSED
    assert finished.model_version == 1 and finished.summary["model_already_written"] is True
    assert torch.equal(_model(stack, 1)["w"], TINY_MODEL["w"] * 2.0)


class _RecordingS3:
    """The S3 client, keeping every DeleteObjects request it sent."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3
        self.sent: list[dict[str, Any]] = []

    def delete_objects(self, **kwargs: Any) -> Any:
        self.sent.append(kwargs)
        return self._s3.delete_objects(**kwargs)


def test_updates_are_deleted_in_batches_of_at_most_a_thousand_naming_their_etags(
    stack: Stack,
) -> None:
    """2,001 answers: three DeleteObjects requests. (Objects stored for the first, the
    thousand-and-first and the last; S3 reports a missing key of a DeleteObjects deleted.)"""
    s3 = stack.clients.s3
    answers = []
    for i in range(2001):
        key = f"{layout.UPDATES_PREFIX}client-{i:04d}/round-000001.safetensors"
        etag = '"0f343b0931126a20f133d67c2b018a3b"'
        if i in (0, 1000, 2000):
            etag = s3.put_object(Bucket=stack.names.updates_bucket, Key=key, Body=b"x")["ETag"]
        answers.append(Answer(Outcome.ACCEPTED, key, etag=etag.strip('"')))
    answers.append(Answer(Outcome.REJECTED, "", reason="no object"))  # nothing to delete
    recording = _RecordingS3(s3)
    ctx = replace(Averager(stack.clients, stack.names, stack.config).context, s3=recording)

    done = update_disposal.dispose_answers(ctx, answers)

    assert [len(r["Delete"]["Objects"]) for r in recording.sent] == [1000, 1000, 1]
    assert done.deleted == 2001 and done.failed == {}
    assert _updates(stack) == []
    first = recording.sent[0]["Delete"]["Objects"][0]
    assert first["ETag"] == f'"{answers[0].etag}"'  # only while it is the object answered


class _RefusingDeletes:
    """The S3 client, whose DeleteObjects S3 refuses (a policy changed by hand, say)."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def delete_objects(self, **kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "DeleteObjects")


def test_a_refused_delete_leaves_the_updates_to_the_lifecycle_and_the_round_closed(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    store = _open_round(stack, "a", "b")
    averager = Averager(stack.clients, stack.names, stack.config)
    refusing = replace(averager.context, s3=_RefusingDeletes(stack.clients.s3))
    for client in ("a", "b"):
        (update,) = s3_updates(stack.upload_update(client, 1, _scaled(2.0)))
        judging.handle_update(refusing, update)

    finished = store.get("test", 1)
    assert finished is not None and finished.status is RoundState.CLOSED
    assert len(_updates(stack)) == 2
    assert "the bucket's lifecycle will expire them" in caplog.text
