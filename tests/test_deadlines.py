"""Deadlines on a controlled clock: quorum relaxes at the soft deadline, rounds without
quorum are abandoned at the hard one, late updates are recorded and ignored, lost S3 events
are recovered by the tick, and an aggregation that died is taken over when its lease expires."""

from __future__ import annotations

import time

import pytest
import torch

from sfl.core import layout
from sfl.learning.rules.aggregation import FedAvg
from sfl.server import watchdog
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.server.notifications import UpdateEvent
from sfl.server.shards import Invoker
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import TINY_MODEL, TRAINED, Stack


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _setup(
    stack: Stack, *clients: str, invoke_shard: Invoker | None = None, **config: object
) -> tuple[Averager, Clock, RoundStore]:
    stack.config = stack.config.replace(
        round_soft_deadline_seconds=60, round_deadline_seconds=120, **config
    )
    clock = Clock()
    stack.put_model(0, TINY_MODEL)
    stack.register(*clients)
    assert start_round(stack.clients, stack.names, stack.config, clock=clock).started
    averager = Averager(
        stack.clients, stack.names, stack.config, clock=clock, invoke_shard=invoke_shard
    )
    return averager, clock, RoundStore(stack.clients.dynamodb, stack.names.rounds_table)


def _deliver(averager: Averager, event: dict[str, object]) -> str:
    return averager.handle_update(_event(event)).result


def _event(event: dict[str, object]) -> UpdateEvent:
    record = event["Records"][0]["s3"]  # type: ignore[index]
    return UpdateEvent(
        bucket=record["bucket"]["name"],
        key=layout.update_key(*_client_round(record["object"]["key"])),
        size=record["object"]["size"],
        etag=record["object"]["eTag"],
    )


def _client_round(encoded_key: str) -> tuple[str, int]:
    from urllib.parse import unquote_plus

    parsed = layout.parse_update_key(unquote_plus(encoded_key))
    return parsed.client_id, parsed.round


def test_min_fraction_aggregates_at_the_soft_deadline(stack: Stack) -> None:
    averager, clock, store = _setup(
        stack, "a", "b", "dead", quorum="min_fraction", min_answered_fraction=0.5
    )
    _deliver(averager, stack.upload_update("a", 1, TRAINED))
    _deliver(averager, stack.upload_update("b", 1, TRAINED))

    assert averager.tick().action == "waiting"  # before the soft deadline: wait for "dead"
    clock.now += 61
    tick = averager.tick()

    assert tick.action == "finished" and tick.status == "CLOSED"
    closed = store.get("test", 1)
    assert (
        closed is not None and sorted(closed.accepted) == ["a", "b"] and closed.model_version == 1
    )


def test_all_answered_abandons_at_the_hard_deadline_and_the_next_round_reuses_the_model(
    stack: Stack,
) -> None:
    averager, clock, store = _setup(stack, "a", "dead", quorum="all_answered")
    _deliver(averager, stack.upload_update("a", 1, TRAINED))
    clock.now += 61
    assert averager.tick().action == "waiting"
    clock.now += 60

    tick = averager.tick()

    assert tick.status == "ABANDONED"
    abandoned = store.get("test", 1)
    assert abandoned is not None and "1 of 2 answered" in abandoned.abandon_reason
    stack.register("a", "dead")
    nxt = start_round(stack.clients, stack.names, stack.config, clock=clock)
    assert nxt.started and store.get("test", 2).base_version == 0  # type: ignore[union-attr]


def test_a_late_update_is_refused_and_writes_nothing(stack: Stack) -> None:
    averager, clock, store = _setup(
        stack, "a", "late", quorum="min_fraction", min_answered_fraction=0.5
    )
    _deliver(averager, stack.upload_update("a", 1, TRAINED))
    clock.now += 61
    averager.tick()  # closes on "a"
    late = _deliver(averager, stack.upload_update("late", 1, TRAINED))

    round_ = store.get("test", 1)
    assert late == "rejected"
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert "late" not in round_.answers and round_.other_rejections == ()
    assert list(round_.accepted) == ["a"]


@pytest.mark.parametrize(
    ("quorum", "ends_as"),
    [("min_fraction", RoundState.CLOSED), ("all_answered", RoundState.ABANDONED)],
)
def test_an_update_after_the_hard_deadline_never_counts_even_before_the_tick(
    stack: Stack, quorum: str, ends_as: RoundState
) -> None:
    averager, clock, store = _setup(stack, "a", "slow", quorum=quorum, min_answered_fraction=0.5)
    _deliver(averager, stack.upload_update("a", 1, TRAINED))
    clock.now += 121  # past the hard deadline; no tick has run

    result = averager.handle_update(_event(stack.upload_update("slow", 1, TRAINED)))

    assert (result.result, result.reason) == ("rejected", "past_deadline")
    assert store.get("test", 1).status is RoundState.OPEN  # type: ignore[union-attr]
    averager.tick()  # a refusal writes nothing: the tick ends the round, without "slow"
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is ends_as
    assert "slow" not in round_.answers


def test_the_watchdog_applies_the_hard_deadline_before_looking_for_lost_events(
    stack: Stack,
) -> None:
    """Deadlines come first and never wait on per-object work: an upload whose S3 event was
    lost and that no tick found before the hard deadline does not save the round."""
    averager, clock, store = _setup(stack, "a", "b", quorum="all_answered")
    _deliver(averager, stack.upload_update("a", 1, TRAINED))
    stack.upload_update("b", 1, TRAINED)  # stored now; its event never arrives
    clock.now += 121

    tick = averager.tick()

    assert tick.status == "ABANDONED"
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.ABANDONED
    assert "b" not in round_.answers


def test_a_retried_event_after_the_deadline_counts_if_s3_stored_it_in_time(stack: Stack) -> None:
    averager, clock, store = _setup(stack, "a", "b", quorum="all_answered")
    _deliver(averager, stack.upload_update("a", 1, TRAINED))
    record = stack.upload_update("b", 1, TRAINED)["Records"][0]["s3"]
    clock.now += 121  # Lambda retried the event much later
    on_time = UpdateEvent(
        bucket=record["bucket"]["name"],
        key=layout.update_key("b", 1),
        size=record["object"]["size"],
        etag=record["object"]["eTag"],
        uploaded_at=clock.now - 100,  # the record's eventTime: inside the round
    )

    assert averager.handle_update(on_time).result == "accepted"
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED


def test_tick_recovers_an_update_whose_event_was_lost(stack: Stack) -> None:
    averager, _, store = _setup(stack, "a", "b", quorum="all_answered")
    _deliver(averager, stack.upload_update("a", 1, TRAINED))
    stack.upload_update("b", 1, TRAINED)  # its S3 event is never delivered

    tick = averager.tick()

    assert tick.details["recovered"] == ["b:accepted"]
    assert tick.status == "CLOSED"
    assert sorted(store.get("test", 1).accepted) == ["a", "b"]  # type: ignore[union-attr]


def test_each_tick_looks_for_a_bounded_window_of_silent_clients(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round of thousands must not cost thousands of S3 LISTs a tick: each tick looks for
    at most MAX_RECOVERY_LOOKS silent clients, and successive ticks cover all of them."""
    clients = ("a", "b", "c", "d", "e")
    averager, clock, store = _setup(stack, *clients, quorum="all_answered")
    monkeypatch.setattr(watchdog, "MAX_RECOVERY_LOOKS", 2)
    for client in clients:
        stack.upload_update(client, 1, TRAINED)  # no S3 event is ever delivered

    found: list[list[str]] = []
    for _ in range(3):
        found.append(averager.tick().details.get("recovered", []))
        clock.now += 1

    assert [len(f) for f in found[:2]] == [2, 2]
    assert sorted(c.split(":")[0] for f in found for c in f) == sorted(clients)
    assert store.get("test", 1).status is RoundState.CLOSED  # type: ignore[union-attr]


class _CrashingFedAvg(FedAvg):
    def result(self) -> dict[str, torch.Tensor] | None:
        raise RuntimeError("averager crashed mid-aggregation")


def test_a_crashed_aggregation_is_taken_over_after_its_lease(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    averager, clock, store = _setup(stack, "a", quorum="all_answered", aggregation_lease_seconds=30)
    import sfl.learning.rules.aggregation as aggregation

    monkeypatch.setattr(aggregation, "FedAvg", _CrashingFedAvg)
    with pytest.raises(RuntimeError, match="mid-aggregation"):
        _deliver(averager, stack.upload_update("a", 1, TRAINED))
    monkeypatch.setattr(aggregation, "FedAvg", FedAvg)
    stuck = store.get("test", 1)
    assert stuck is not None and stuck.status is RoundState.AGGREGATING

    assert averager.tick().action == "waiting"  # lease still held by the crashed invocation
    clock.now += 31
    rescuer = Averager(stack.clients, stack.names, stack.config, clock=clock)
    tick = rescuer.tick()

    assert tick.status == "CLOSED"
    closed = store.get("test", 1)
    assert closed is not None and closed.aggregation_attempts == 2 and closed.model_version == 1
    versions = stack.clients.s3.list_object_versions(
        Bucket=stack.names.models_bucket, Prefix=layout.model_key(1)
    )
    assert len(versions["Versions"]) == 1
