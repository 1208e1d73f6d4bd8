"""Local mode keeps S3's and DynamoDB's atomic conditional writes: of concurrent writers with
the same condition exactly one wins, as in AWS (moto's server alone can let several win)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from botocore.exceptions import ClientError

from sfl.local.emulator import LocalAws

WRITERS = 8
TRIALS = 40


@pytest.fixture(autouse=True)
def eager_thread_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter can, so a check-then-write window in the
    emulator's request threads is hit if it exists (the default is every 5 ms)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _race(write: Callable[[int], None]) -> int:
    """Start WRITERS threads at once, each calling write(i); how many succeeded. A writer
    that lost must have lost to the condition, nothing else."""
    barrier = threading.Barrier(WRITERS)
    wins: list[int] = []
    unexpected: list[BaseException] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            write(i)
        except ClientError as error:
            code = error.response["Error"]["Code"]
            if code not in {"PreconditionFailed", "ConditionalCheckFailedException"}:
                unexpected.append(error)
            return
        except BaseException as error:  # reported in the main thread
            unexpected.append(error)
            return
        wins.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a writer never finished"
    assert not unexpected, unexpected
    return len(wins)


def test_concurrent_create_only_puts_of_one_key_have_one_winner(local_aws: LocalAws) -> None:
    clients = [local_aws.client("s3") for _ in range(WRITERS)]
    clients[0].create_bucket(Bucket="race")
    # Versioned, so a second successful write would be visible as a second version.
    clients[0].put_bucket_versioning(Bucket="race", VersioningConfiguration={"Status": "Enabled"})
    winners = []
    for trial in range(TRIALS):
        key = f"models/v{trial}"

        def put(i: int, key: str = key) -> None:
            clients[i].put_object(Bucket="race", Key=key, Body=f"{i}".encode(), IfNoneMatch="*")

        winners.append(_race(put))
        versions = clients[0].list_object_versions(Bucket="race", Prefix=key)
        assert len(versions.get("Versions", [])) == 1
    assert winners == [1] * TRIALS


def test_concurrent_conditional_updates_of_one_item_have_one_winner(local_aws: LocalAws) -> None:
    clients = [local_aws.client("dynamodb") for _ in range(WRITERS)]
    clients[0].create_table(
        TableName="race",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    winners = []
    for trial in range(TRIALS):
        key = {"pk": {"S": f"round-{trial}"}}

        def claim(i: int, key: dict[str, dict[str, str]] = key) -> None:
            clients[i].update_item(
                TableName="race",
                Key=key,
                UpdateExpression="SET #o = :me",
                ConditionExpression="attribute_not_exists(#o)",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":me": {"S": str(i)}},
            )

        winners.append(_race(claim))
    assert winners == [1] * TRIALS
