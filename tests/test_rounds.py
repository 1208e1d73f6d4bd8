"""Round state transitions are conditional writes: each has exactly the winners it should."""

from __future__ import annotations

import time

from sfl.state.rounds import Answer, Outcome, RecordResult, Round, RoundState, RoundStore
from tests.conftest import Stack


def _round(number: int, selected: tuple[str, ...] = ("a", "b"), base: int = 0) -> Round:
    now = time.time()
    return Round(
        experiment="test",
        round=number,
        status=RoundState.OPEN,
        base_version=base,
        selected=selected,
        created_at=now,
        deadline_at=now + 600,
        train_config={"local_epochs": 1},
    )


def _answer(client: str) -> Answer:
    return Answer(
        outcome=Outcome.ACCEPTED,
        key=f"updates/{client}/round-000001.safetensors",
        etag="e1",
        num_examples=5,
    )


def test_round_one_is_created_once(stack: Stack) -> None:
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)

    assert store.create(_round(1), None) is True
    assert store.create(_round(1, selected=("z",)), None) is False

    stored = store.get("test", 1)
    assert stored is not None and stored.selected == ("a", "b") and stored.status is RoundState.OPEN


def test_next_round_waits_until_the_previous_is_finished(stack: Stack) -> None:
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    first = _round(1)
    store.create(first, None)

    assert store.create(_round(2), first) is False  # round 1 still OPEN
    assert store.abandon("test", 1, "test", time.time()) is True
    assert store.create(_round(2), store.get("test", 1)) is True
    assert store.latest("test").round == 2  # type: ignore[union-attr]


def test_a_client_answers_once_and_only_if_selected(stack: Stack) -> None:
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    store.create(_round(1), None)

    first = store.record_answer("test", 1, "a", _answer("a"))
    again = store.record_answer("test", 1, "a", _answer("a"))
    stranger = store.record_answer("test", 1, "z", _answer("z"))

    assert first.result is RecordResult.RECORDED
    assert again.result is RecordResult.ALREADY_ANSWERED
    assert stranger.result is RecordResult.NOT_SELECTED
    assert set(store.get("test", 1).answers) == {"a"}  # type: ignore[union-attr]


def test_one_aggregation_wins_and_an_expired_lease_is_taken_over(stack: Stack) -> None:
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    store.create(_round(1), None)
    now = time.time()

    first = store.begin_aggregation("test", 1, "owner-1", now, lease_seconds=30)
    second = store.begin_aggregation("test", 1, "owner-2", now + 1, lease_seconds=30)
    takeover = store.begin_aggregation("test", 1, "owner-3", now + 31, lease_seconds=30)

    assert first is not None and first.status is RoundState.AGGREGATING
    assert second is None
    assert takeover is not None and takeover.lease_owner == "owner-3"
    assert takeover.aggregation_attempts == 2
    # only the current lease holder may close
    assert store.close("test", 1, "owner-1", 1, now, {"participants": 0}) is False
    assert store.close("test", 1, "owner-3", 1, now, {"participants": 0}) is True
    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED and closed.model_version == 1


def test_answers_after_close_are_refused(stack: Stack) -> None:
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    store.create(_round(1), None)
    store.abandon("test", 1, "deadline", time.time())

    late = store.record_answer("test", 1, "a", _answer("a"))

    assert late.result is RecordResult.NOT_OPEN
    assert store.get("test", 1).answers == {}  # type: ignore[union-attr]
