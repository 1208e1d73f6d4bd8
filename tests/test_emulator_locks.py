"""The emulator's per-resource locks: a transaction and a plain write on one item still have
one winner, a held bucket holds up only its own requests, and the change feed counts the
S3 writes that succeeded (the wake-up local clients wait on)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from botocore.exceptions import ClientError

from sfl.local.emulator import AtomicRequests, LocalAws
from tests.test_emulator_atomicity import TRIALS, WRITERS, _race, eager_thread_switching

__all__ = ["eager_thread_switching"]  # the fixture, applied to these races too


def _middleware(aws: LocalAws) -> AtomicRequests:
    app = aws._server._server.app
    assert isinstance(app, AtomicRequests)
    return app


def test_a_transaction_and_an_update_on_one_item_have_one_winner(local_aws: LocalAws) -> None:
    clients = [local_aws.client("dynamodb") for _ in range(WRITERS)]
    for table in ("tx-race", "tx-other"):
        clients[0].create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
    winners = []
    for trial in range(TRIALS):
        key = {"pk": {"S": f"round-{trial}"}}
        update: dict[str, Any] = {
            "TableName": "tx-race",
            "Key": key,
            "UpdateExpression": "SET #o = :me",
            "ConditionExpression": "attribute_not_exists(#o)",
            "ExpressionAttributeNames": {"#o": "owner"},
        }

        def claim(i: int, key: dict[str, Any] = key, update: dict[str, Any] = update) -> None:
            values = {":me": {"S": str(i)}}
            if i % 2:
                clients[i].update_item(**update, ExpressionAttributeValues=values)
                return
            try:  # two tables: the transaction holds both tables' locks
                clients[i].transact_write_items(
                    TransactItems=[
                        {"Update": {**update, "ExpressionAttributeValues": values}},
                        {"Put": {"TableName": "tx-other", "Item": {**key, "by": {"S": str(i)}}}},
                    ]
                )
            except ClientError as error:
                if error.response["Error"]["Code"] == "TransactionCanceledException":
                    raise ClientError(
                        {"Error": {"Code": "ConditionalCheckFailedException"}}, "Tx"
                    ) from error
                raise

        winners.append(_race(claim))
    assert winners == [1] * TRIALS


def test_a_held_bucket_holds_up_its_own_requests_only(local_aws: LocalAws) -> None:
    s3 = local_aws.client("s3")
    for bucket in ("held", "free"):
        s3.create_bucket(Bucket=bucket)
    lock = _middleware(local_aws)._lock("s3", "held")
    done: dict[str, Any] = {}

    def put(bucket: str) -> None:
        done[bucket] = local_aws.client("s3").put_object(Bucket=bucket, Key="k", Body=b"x")

    with lock:
        waiting = threading.Thread(target=put, args=("held",))
        waiting.start()
        free = threading.Thread(target=put, args=("free",))
        free.start()
        free.join(timeout=60)
        assert "free" in done  # another bucket's request went through
        assert "held" not in done and waiting.is_alive()  # this one waits for the lock
    waiting.join(timeout=60)
    assert "held" in done
    assert s3.get_object(Bucket="held", Key="k")["Body"].read() == b"x"


def test_the_change_feed_counts_successful_writes_of_each_object(local_aws: LocalAws) -> None:
    s3 = local_aws.client("s3")
    s3.create_bucket(Bucket="fed")
    feed = local_aws.feed
    assert feed.writes("fed", "rounds/current.json") == 0
    pause = feed.waiter("fed", "rounds/current.json")
    s3.put_object(Bucket="fed", Key="rounds/current.json", Body=b"{}")
    assert feed.writes("fed", "rounds/current.json") == 1
    pause(600.0)  # returns at once: written since the waiter was made
    s3.get_object(Bucket="fed", Key="rounds/current.json")
    s3.put_object(Bucket="fed", Key="other", Body=b"{}")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket="fed", Key="rounds/current.json", Body=b"{}", IfNoneMatch="*")
    assert feed.writes("fed", "rounds/current.json") == 1  # reads and refusals do not count
    stop = threading.Event()
    pause = feed.waiter("fed", "rounds/current.json", stop)
    waiter = threading.Thread(target=pause, args=(600.0,))
    waiter.start()
    s3.put_object(Bucket="fed", Key="rounds/current.json", Body=b"{}")
    waiter.join(timeout=60)
    assert not waiter.is_alive()  # the write ended the wait
    waiter = threading.Thread(target=pause, args=(600.0,))
    waiter.start()
    stop.set()
    feed.wake_all()
    waiter.join(timeout=60)
    assert not waiter.is_alive()  # and so does stopping
