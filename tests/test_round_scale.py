"""A round of a thousand clients through the real RoundStore on the local moto server: every
answer recorded once, counters exact, the round item small whatever the round's size."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from sfl.state.rounds import (
    Answer,
    Outcome,
    RecordResult,
    Round,
    RoundState,
    RoundStore,
    slot_partition,
)
from tests.conftest import Stack

LARGE_ROUND = 1_000
ANSWERING = range(0, LARGE_ROUND, 4)  # a quarter answer: 500 transactions keep the test fast
DYNAMODB_ITEM_LIMIT = 400 * 1024


def _round(number: int, selected: tuple[str, ...]) -> Round:
    now = time.time()
    return Round(
        experiment="test",
        round=number,
        status=RoundState.OPEN,
        base_version=0,
        selected=selected,
        created_at=now,
        deadline_at=now + 600,
        train_config={"local_epochs": 1},
    )


def _answer(client: str, i: int, *, etag: str = "e1") -> Answer:
    rejected = i % 10 == 0  # every tenth answer is a rejection, with a reason
    return Answer(
        outcome=Outcome.REJECTED if rejected else Outcome.ACCEPTED,
        key=f"updates/{client}/round-000001.safetensors",
        etag=etag,
        size=1000 + i,
        bytes_down=7,
        num_examples=5,
        reason="shape: wrong tensor names" if rejected else "",
        metrics={"loss": 0.5, "accuracy": 0.9},
    )


def _item_bytes(store: RoundStore, stack: Stack) -> int:
    item = stack.clients.dynamodb.get_item(
        TableName=stack.names.rounds_table,
        Key={"experiment": {"S": "test"}, "round": {"N": "1"}},
        ConsistentRead=True,
    )["Item"]
    return len(json.dumps(item))


def test_a_round_of_a_thousand_records_each_answer_once_with_exact_counters(stack: Stack) -> None:
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    clients = tuple(f"device-{i:05d}" for i in range(LARGE_ROUND))
    assert store.create(_round(1, clients), None) is True

    head = store.get("test", 1, slots=False)
    assert head is not None and head.slots_ready and not head.slots_loaded
    assert head.selected == () and head.num_selected == LARGE_ROUND

    def answer(i: int) -> RecordResult:
        return store.record_answer("test", 1, clients[i], _answer(clients[i], i)).result

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(answer, ANSWERING))
    assert results == [RecordResult.RECORDED] * len(ANSWERING)

    rejected = sum(1 for i in ANSWERING if i % 10 == 0)
    head = store.get("test", 1, slots=False)
    assert head is not None
    assert (head.num_answered, head.num_accepted, head.num_rejected) == (
        len(ANSWERING),
        len(ANSWERING) - rejected,
        rejected,
    )
    assert head.rejection_reasons == {"shape": rejected}
    assert head.bytes_up == sum(1000 + i for i in ANSWERING)
    assert head.bytes_down == 7 * len(ANSWERING)
    assert _item_bytes(store, stack) < 4 * 1024  # counters, not answers: ~1/100 of the limit

    full = store.get("test", 1)
    assert full is not None and full.selected == clients
    assert set(full.answers) == {clients[i] for i in ANSWERING}
    assert sorted(full.accepted) == [clients[i] for i in ANSWERING if i % 10]
    assert full.answers[clients[4]].size == 1004
    silent = {s.client_id for s in store.slots("test", 1, only="unanswered")}
    assert silent == set(clients) - set(full.answers)

    # A repeat, a stranger, a late answer: refused as before, counters untouched.
    again = store.record_answer("test", 1, clients[4], _answer(clients[4], 4, etag="e2"))
    assert again.result is RecordResult.ALREADY_ANSWERED
    assert again.answer is not None and again.answer.etag == "e1"
    assert again.round is not None and again.round.num_answered == len(ANSWERING)
    stranger = store.record_answer("test", 1, "not-picked", _answer("not-picked", 1))
    assert stranger.result is RecordResult.NOT_SELECTED
    assert store.record_answer("test", 2, clients[0], _answer(clients[0], 1)).result is (
        RecordResult.NO_SUCH_ROUND
    )
    assert store.abandon("test", 1, "test", time.time()) is True
    late = store.record_answer("test", 1, clients[5], _answer(clients[5], 5))
    assert late.result is RecordResult.NOT_OPEN
    repeat = store.record_answer("test", 1, clients[8], _answer(clients[8], 8, etag="e9"))
    assert repeat.result is RecordResult.ALREADY_ANSWERED  # answered before: that comes first
    after = store.get("test", 1, slots=False)
    assert after is not None and after.num_answered == len(ANSWERING)
    assert after.bytes_up == head.bytes_up


def test_concurrent_answers_and_duplicates_count_once(stack: Stack) -> None:
    """Each client's answer arrives twice at once (a duplicated S3 event) from 8 threads:
    exactly one of the two is recorded, and the counters equal the clients."""
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    clients = tuple(f"c{i:03d}" for i in range(150))
    store.create(_round(1, clients), None)

    jobs = [(c, i) for i, c in enumerate(clients)] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            pool.map(lambda job: store.record_answer("test", 1, job[0], _answer(*job)), jobs)
        )
    recorded = Counter(
        job[0] for job, r in zip(jobs, results, strict=True) if r.result is RecordResult.RECORDED
    )
    assert recorded == Counter(clients)  # every client exactly once
    assert {r.result for r in results} == {RecordResult.RECORDED, RecordResult.ALREADY_ANSWERED}
    head = store.get("test", 1, slots=False)
    assert head is not None and head.num_answered == len(clients)
    assert head.num_accepted + head.num_rejected == len(clients)


def test_a_round_whose_slots_are_not_all_written_accepts_nothing(stack: Stack) -> None:
    """The initiator died between the round item and the slots flag: no answer is recorded,
    and only after the grace period may the round be abandoned."""
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    half = _round(1, ("a", "b"))
    assert store._create_item(half.__class__(**{**half.__dict__, "slots_ready": False}), None)
    store.write_slots(half, ("a",))  # died after the first slot

    assert store.record_answer("test", 1, "a", _answer("a", 1)).result is RecordResult.NOT_OPEN
    assert store.abandon_unready("test", 1, half.created_at + 60) is False  # still in grace
    assert store.abandon_unready("test", 1, half.created_at + 3600) is True
    gone = store.get("test", 1)
    assert gone is not None and gone.status is RoundState.ABANDONED and gone.answers == {}


def test_slots_live_in_their_own_partition(stack: Stack) -> None:
    """Slot items never show up as rounds: history and latest read round records only."""
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    store.create(_round(1, ("a", "b", "c")), None)
    assert [r.round for r in store.history("test")] == [1]
    items = stack.clients.dynamodb.query(
        TableName=stack.names.rounds_table,
        KeyConditionExpression="experiment = :p",
        ExpressionAttributeValues={":p": {"S": slot_partition("test", 1)}},
    )["Items"]
    assert sorted(i["client_id"]["S"] for i in items) == ["a", "b", "c"]
    assert all(int(i["expires_at"]["N"]) > time.time() for i in items)
