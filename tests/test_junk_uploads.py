"""A flood of junk uploads costs the attacker, not the round.

An upload that is not a selected client's first answer (from a client nobody picked, a second
upload after an answer, one after the round ended) is refused with two reads and one
conditional delete of the object, and nothing written to DynamoDB: the round item, which
every honest answer's transaction writes, is never touched, and the object is never
downloaded. Requests are counted per operation on the averager's own boto3 clients
(botocore's ``before-call`` event), against the local endpoint.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sfl.core import layout
from sfl.server.averager import Averager
from sfl.server.notifications import UpdateEvent
from sfl.state.aws import AwsClients
from sfl.state.rounds import RoundState
from tests.conftest import TRAINED, Stack
from tests.test_deadlines import _deliver, _event, _setup

WRITES = {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}


@contextmanager
def counting(clients: AwsClients) -> Iterator[Counter[str]]:
    """Every request the clients send meanwhile, as ``service:Operation`` -> count."""
    counts: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        counts[f"{model.service_model.service_name}:{model.name}"] += 1

    hooks = [(c, "before-call.*.*") for c in (clients.s3, clients.dynamodb)]
    for client, event in hooks:
        client.meta.events.register(event, count, unique_id="sfl-junk-count")
    try:
        yield counts
    finally:
        for client, event in hooks:
            client.meta.events.unregister(event, unique_id="sfl-junk-count")


def _round_item(stack: Stack) -> dict[str, Any]:
    return stack.clients.dynamodb.get_item(
        TableName=stack.names.rounds_table,
        Key={"experiment": {"S": "test"}, "round": {"N": "1"}},
        ConsistentRead=True,
    )["Item"]


def _junk(stack: Stack, averager: Averager, client: str, i: int) -> str:
    body = f"junk {i} ".encode() * 100
    key = layout.update_key(client, 1)
    etag = stack.clients.s3.put_object(Bucket=stack.names.updates_bucket, Key=key, Body=body)[
        "ETag"
    ]
    return averager.handle_update(UpdateEvent(stack.names.updates_bucket, key, len(body), etag))


def test_junk_uploads_read_two_items_and_write_nothing(stack: Stack) -> None:
    averager, _, store = _setup(stack, "a", "b", "late", quorum="all_answered")
    stack.register("flooder")
    assert _deliver(averager, stack.upload_update("a", 1, TRAINED)) == "accepted"
    before = _round_item(stack)

    outcomes = []
    with counting(stack.clients) as counts:
        for i in range(20):
            outcomes.append(_junk(stack, averager, "flooder", i))  # nobody picked it
            outcomes.append(_junk(stack, averager, "a", i))  # it answered already
    per_upload = {op: n / len(outcomes) for op, n in counts.items() if not op.startswith("s3:Put")}

    assert {(o.result, o.reason) for o in outcomes} == {
        ("rejected", "not_selected"),
        ("rejected", "duplicate"),
    }
    # The round item and the client's slot read; the junk object deleted (If-Match its ETag).
    assert per_upload == {"dynamodb:GetItem": 2.0, "s3:DeleteObject": 1.0}
    assert _round_item(stack) == before
    listed = stack.clients.s3.list_objects_v2(Bucket=stack.names.updates_bucket)
    assert [o["Key"] for o in listed.get("Contents", [])] == []  # a's answer went with its junk
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.OPEN and list(round_.answers) == ["a"]


def test_an_upload_after_the_deadline_is_refused_without_a_write_until_the_tick(
    stack: Stack,
) -> None:
    averager, clock, _ = _setup(stack, "a", "late", quorum="all_answered")
    assert _deliver(averager, stack.upload_update("a", 1, TRAINED)) == "accepted"
    clock.now += 121  # past the hard deadline
    before = _round_item(stack)

    with counting(stack.clients) as counts:
        refused = [_junk(stack, averager, "late", i) for i in range(5)]

    assert {o.reason for o in refused} == {"past_deadline"}
    assert not WRITES & {op.split(":")[1] for op in counts}
    assert counts["s3:GetObject"] == 0
    assert _round_item(stack) == before
    assert averager.tick().status == "ABANDONED"  # the watchdog ends it, as for silence


def test_a_duplicate_delivery_of_an_accepted_answer_stays_a_no_op(stack: Stack) -> None:
    averager, _, store = _setup(stack, "a", "b", quorum="all_answered")
    event = stack.upload_update("a", 1, TRAINED)
    assert _deliver(averager, event) == "accepted"
    before = _round_item(stack)

    with counting(stack.clients) as counts:
        again = [_deliver(averager, event) for _ in range(3)]

    assert again == ["duplicate"] * 3
    assert counts == {"dynamodb:GetItem": 6}
    assert _round_item(stack) == before
    assert store.get("test", 1).answers["a"].etag == event["Records"][0]["s3"]["object"]["eTag"]  # type: ignore[union-attr]


def test_a_refusal_deletes_only_the_object_it_refused(stack: Stack) -> None:
    """Events come out of order: the later upload is judged first and accepted; the earlier
    one's event is then a duplicate, and its delete (If-Match the earlier ETag) leaves the
    accepted object in place for the aggregation."""
    averager, _, store = _setup(stack, "a", "b", quorum="all_answered")
    first = stack.upload_update("a", 1, TRAINED, num_examples=5)
    second = stack.upload_update("a", 1, TRAINED, num_examples=7)
    assert _deliver(averager, second) == "accepted"

    refused = averager.handle_update(_event(first))

    assert (refused.result, refused.reason) == ("rejected", "duplicate")
    kept = stack.clients.s3.head_object(
        Bucket=stack.names.updates_bucket, Key=layout.update_key("a", 1)
    )
    assert kept["ETag"] == f'"{second["Records"][0]["s3"]["object"]["eTag"]}"'
    assert _deliver(averager, stack.upload_update("b", 1, TRAINED)) == "accepted"
    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert closed.summary["num_examples"] == 7 + 10
