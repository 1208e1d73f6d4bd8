"""A hostile or broken device can cost its own update, never the round, the model or selection.

Each test plays one thing a device with valid credentials can do (what it uploads, what it
claims, what it writes to its own registry item) and asserts what the server does about it:
the round record, the registry item, the model's tensor values. Uploads go to the local S3
endpoint and are judged by the real averager, on a controlled clock where time matters.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from sfl.core import layout
from sfl.core.selection import Candidate, cooled_down
from sfl.learning import codec
from sfl.learning.rules.aggregation import FedAvg
from sfl.server import answers
from sfl.server.initiator import start_round
from sfl.server.notifications import UpdateEvent
from sfl.state.registry import ClientRegistry, active_shard
from sfl.state.rounds import RoundState, storable
from tests.conftest import TINY_MODEL, TRAINED, Stack
from tests.test_deadlines import _deliver, _setup

DELTA = {name: TRAINED[name] - TINY_MODEL[name] for name in TINY_MODEL}


def _moved(by: float) -> dict[str, torch.Tensor]:
    return {name: TINY_MODEL[name] + by * DELTA[name] for name in TINY_MODEL}


def _model(stack: Stack, version: int) -> dict[str, torch.Tensor]:
    body = stack.clients.s3.get_object(
        Bucket=stack.names.models_bucket, Key=layout.model_key(version)
    )["Body"].read()
    return codec.decode(body)


def _registry_item(stack: Stack, client: str) -> dict[str, Any]:
    item = stack.clients.dynamodb.get_item(
        TableName=stack.names.clients_table, Key={"client_id": {"S": client}}
    )["Item"]
    return {k: next(iter(v.values())) for k, v in item.items()}


# --- what it uploads --------------------------------------------------------------------


def test_one_device_claiming_the_most_examples_with_a_huge_update_does_not_decide_the_model(
    stack: Stack,
) -> None:
    """Four honest clients move the model by d (10 examples each); the attacker sends
    1000 d and claims 10,000,000 examples. Its weight is capped at the median claim (10)
    and its change clipped to the median change (d): it weighs and moves as one honest
    client does, so the model moves by d, not by ~1000 d."""
    honest = ["h1", "h2", "h3", "h4"]
    averager, _, store = _setup(stack, *honest, "attacker", quorum="all_answered")
    for client in honest:
        _deliver(averager, stack.upload_update(client, 1, _moved(1.0), num_examples=10))
    _deliver(averager, stack.upload_update("attacker", 1, _moved(1000.0), num_examples=10_000_000))

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert round_.summary["clipped"] == ["attacker"]
    model = _model(stack, 1)
    for name, expected in _moved(1.0).items():
        assert torch.allclose(model[name], expected, atol=1e-5), name


def test_the_bounds_leave_an_honest_round_within_them_exactly_fedavg(stack: Stack) -> None:
    """No claim above the median one, no change above the median change: nothing is cut."""
    averager, _, _ = _setup(stack, "a", "b", "c", quorum="all_answered")
    for client, by, n in (("a", 0.8, 10), ("b", 1.0, 20), ("c", 1.0, 20)):
        _deliver(averager, stack.upload_update(client, 1, _moved(by), num_examples=n))

    model = _model(stack, 1)
    for name, expected in _moved((10 * 0.8 + 20 * 1.0 + 20 * 1.0) / 50).items():
        assert torch.allclose(model[name], expected, atol=1e-6), name


def test_a_bug_while_judging_one_update_costs_that_update_only(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = answers.validate_update

    def broken_for_victim(data: bytes, expected: Any, base: Any = None) -> Any:
        if expected.client_id == "victim":
            raise RuntimeError("a bug in our checks")
        return real(data, expected, base)

    monkeypatch.setattr(answers, "validate_update", broken_for_victim)
    averager, _, store = _setup(stack, "honest", "victim", quorum="all_answered")
    assert _deliver(averager, stack.upload_update("victim", 1, TRAINED)) == "rejected"
    _deliver(averager, stack.upload_update("honest", 1, TRAINED))

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert round_.answers["victim"].reason.startswith("internal_error: RuntimeError")
    assert list(round_.accepted) == ["honest"]


# --- the watchdog -----------------------------------------------------------------------


def test_the_tick_applies_the_hard_deadline_even_if_every_object_fails(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    averager, clock, store = _setup(stack, "a", "b", quorum="all_answered")
    stack.upload_update("b", 1, TRAINED)  # its event lost; judging it would blow up

    def explode(context: Any, event: Any) -> Any:
        raise RuntimeError("per-object work failed")

    monkeypatch.setattr(answers, "handle_update", explode)
    clock.now += 121

    assert averager.tick().status == "ABANDONED"
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.ABANDONED


class _AlwaysCrashing(FedAvg):
    def result(self) -> dict[str, torch.Tensor] | None:
        raise MemoryError("the aggregation runs out of memory every time")


def test_an_aggregation_that_keeps_failing_is_abandoned_after_three_attempts(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sfl.learning.rules.aggregation as aggregation

    monkeypatch.setattr(aggregation, "FedAvg", _AlwaysCrashing)
    averager, clock, store = _setup(stack, "a", quorum="all_answered", aggregation_lease_seconds=30)
    with pytest.raises(MemoryError):
        _deliver(averager, stack.upload_update("a", 1, TRAINED))
    for _ in range(2):
        clock.now += 31
        with pytest.raises(MemoryError):
            averager.tick()
    clock.now += 31

    tick = averager.tick()

    round_ = store.get("test", 1)
    assert tick.status == "ABANDONED"
    assert round_ is not None and round_.aggregation_attempts == 3
    assert round_.abandon_reason == "aggregation failed 3 times"
    # the next round starts from the same model
    stack.register("a")
    assert start_round(stack.clients, stack.names, stack.config, clock=clock).started


# --- what it writes to its registry item ---------------------------------------------------


def _put_item(stack: Stack, item: dict[str, Any]) -> None:
    """A device's own item, in the active index's shard its heartbeat would write."""
    shard = {"N": str(active_shard(item["client_id"]["S"]))}
    stack.clients.dynamodb.put_item(
        TableName=stack.names.clients_table, Item={"active_shard": shard, **item}
    )


def test_garbage_in_registry_items_is_skipped_and_rounds_still_start(stack: Stack) -> None:
    now = time.time()
    stack.put_model(0, TINY_MODEL)
    stack.register("honest")
    _put_item(  # a device's own item with a string where a number belongs
        stack,
        {
            "client_id": {"S": "strings"},
            "last_seen": {"N": str(now)},
            "ewma_turnaround": {"S": "fast"},
            "missed_streak": {"S": "never"},
        },
    )
    _put_item(stack, {"client_id": {"S": "no spaces allowed"}, "last_seen": {"N": str(now)}})
    _put_item(  # a heartbeat ten years ahead, to stay "active" for ever
        stack, {"client_id": {"S": "from-the-future"}, "last_seen": {"N": str(now + 3.2e8)}}
    )
    stack.config = stack.config.replace(selection="fast_clients")

    result = start_round(stack.clients, stack.names, stack.config)

    assert result.started
    assert sorted(result.selected) == ["honest", "strings"]


def test_turnaround_is_measured_by_the_server_not_reported(stack: Stack) -> None:
    averager, clock, _ = _setup(stack, "a", "b", quorum="all_answered")
    clock.now += 7.0
    _deliver(averager, stack.upload_update("a", 1, TRAINED))
    clock.now += 5.0
    _deliver(averager, stack.upload_update("b", 1, TRAINED))

    a, b = _registry_item(stack, "a"), _registry_item(stack, "b")
    assert float(a["ewma_turnaround"]) == pytest.approx(7.0, abs=0.01)
    assert float(b["ewma_turnaround"]) == pytest.approx(12.0, abs=0.01)
    assert a["rounds_answered"] == "1" and a["last_round"] == "1"
    # a heartbeat (the device's only write) leaves the server's numbers alone
    stack.register("a")
    assert float(_registry_item(stack, "a")["ewma_turnaround"]) == pytest.approx(7.0, abs=0.01)


def test_a_device_that_never_answers_is_counted_and_sits_rounds_out(stack: Stack) -> None:
    averager, clock, store = _setup(stack, "a", "ghost")  # min_fraction: closes on "a" alone
    for number in (1, 2):
        update = stack.upload_update("a", number, _moved(3.0 * number), base_version=number - 1)
        _deliver(averager, update)
        clock.now += 61  # past the soft deadline: quorum without the ghost
        assert averager.tick().status == "CLOSED"
        stack.register("a", "ghost")  # it keeps heartbeating
        if number == 1:
            assert start_round(stack.clients, stack.names, stack.config, clock=clock).started
    ghost = _registry_item(stack, "ghost")
    assert (ghost["missed_streak"], ghost["rounds_missed"], ghost["last_round"]) == ("2", "2", "2")

    third = start_round(stack.clients, stack.names, stack.config, clock=clock)

    assert third.started and third.selected == ("a",)
    assert store.get("test", 3) is not None


def test_cooling_down_never_leaves_nobody() -> None:
    ghosts = [
        Candidate("g1", missed_streak=5, last_round=9),
        Candidate("g2", missed_streak=3, last_round=8),
    ]
    assert cooled_down(ghosts, 10) == ghosts
    assert [c.client_id for c in cooled_down([*ghosts, Candidate("ok")], 10)] == ["ok"]
    # two misses in a row: the next two rounds are sat out
    assert cooled_down([Candidate("g", missed_streak=2, last_round=8)], 10)[0].client_id == "g"
    assert cooled_down([Candidate("g", missed_streak=2, last_round=8), Candidate("ok")], 10) == [
        Candidate("ok")
    ]


def test_a_summary_stores_only_finite_numbers() -> None:
    assert storable({"loss": float("nan"), "n": 3, "x": [1e300, 0.5]}) == {
        "loss": None,
        "n": 3,
        "x": [None, 0.5],
    }


def test_registry_record_round_counts_each_round_once(stack: Stack) -> None:
    stack.register("c")
    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)

    first = registry.record_round("c", 4, answered=True, turnaround=10.0, b=0.5)
    again = registry.record_round("c", 4, answered=True, turnaround=99.0, b=0.5)
    older = registry.record_round("c", 3, answered=False, turnaround=99.0, b=0.5)
    later = registry.record_round("c", 5, answered=False, turnaround=30.0, b=0.5)

    assert (first, again, older, later) == (True, False, False, True)
    record = registry.get("c")
    assert record is not None
    assert record.ewma_turnaround == pytest.approx(20.0)
    assert (record.rounds_answered, record.rounds_missed, record.missed_streak) == (1, 1, 1)


# --- found in review: keys, storage classes, clocks, lone updates --------------------------


def test_an_update_stored_before_its_round_existed_is_not_an_answer(stack: Stack) -> None:
    """Keys are predictable: a device that uploads before the round opens would otherwise be
    found by the watchdog and credited with a turnaround of zero."""
    averager, _, store = _setup(stack, "a", "b", quorum="all_answered")
    round_ = store.get("test", 1)
    assert round_ is not None
    record = stack.upload_update("a", 1, TRAINED)["Records"][0]["s3"]
    early = UpdateEvent(
        bucket=stack.names.updates_bucket,
        key=layout.update_key("a", 1),
        size=record["object"]["size"],
        etag=record["object"]["eTag"],
        uploaded_at=round_.created_at - 30,
    )

    outcome = averager.handle_update(early)

    assert (outcome.result, outcome.reason) == ("rejected", "before_round")
    after = store.get("test", 1)
    assert after is not None and "a" not in after.answers and after.num_answered == 0


def test_an_object_s3_will_not_serve_is_that_updates_rejection(stack: Stack) -> None:
    averager, _, store = _setup(stack, "honest", "archiver", quorum="all_answered")
    key = layout.update_key("archiver", 1)
    body = codec.encode(TRAINED, stack_meta("archiver"))
    etag = stack.clients.s3.put_object(
        Bucket=stack.names.updates_bucket, Key=key, Body=body, StorageClass="GLACIER"
    )["ETag"]

    outcome = averager.handle_update(UpdateEvent(stack.names.updates_bucket, key, len(body), etag))
    _deliver(averager, stack.upload_update("honest", 1, TRAINED))

    assert (outcome.result, outcome.reason) == (
        "rejected",
        "unreadable: S3 says InvalidObjectState",
    )
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert round_.answers["archiver"].reason == "unreadable: S3 says InvalidObjectState"


def test_an_accepted_update_archived_before_aggregation_is_left_out(stack: Stack) -> None:
    averager, _, store = _setup(stack, "honest", "archiver", quorum="all_answered")
    _deliver(averager, stack.upload_update("archiver", 1, _moved(1.5)))
    stack.clients.s3.put_object(  # overwritten, unreadable, after it was accepted
        Bucket=stack.names.updates_bucket,
        Key=layout.update_key("archiver", 1),
        Body=b"x",
        StorageClass="GLACIER",
    )
    _deliver(averager, stack.upload_update("honest", 1, TRAINED))

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert round_.summary["participants"] == 1
    assert set(round_.summary["excluded"]) == {"archiver"}
    model = _model(stack, 1)
    assert all(torch.equal(model[name], TRAINED[name]) for name in TRAINED)


def stack_meta(client: str) -> dict[str, str]:
    return codec.UpdateMetadata(
        round=1, client_id=client, base_version=0, num_examples=10
    ).to_header()


def test_a_lone_update_is_clipped_to_the_last_rounds_bound(stack: Stack) -> None:
    """Alone in a round, an update is its own median; the last closed round's bound (its
    median change) clips it instead."""
    honest = ["h1", "h2", "h3"]
    averager, clock, store = _setup(
        stack, *honest, "attacker", quorum="min_fraction", min_answered_fraction=0.25
    )
    for client in [*honest, "attacker"]:
        _deliver(averager, stack.upload_update(client, 1, _moved(1.0)))
    first = store.get("test", 1)
    assert first is not None and first.status is RoundState.CLOSED
    bound = first.summary["norm_bound"]
    stack.register(*honest, "attacker")
    assert start_round(stack.clients, stack.names, stack.config, clock=clock).started
    second = store.get("test", 2)
    assert second is not None and second.norm_bound_hint == pytest.approx(bound)

    base = _model(stack, 1)
    attack = {name: base[name] + 1000.0 * DELTA[name] for name in base}
    _deliver(averager, stack.upload_update("attacker", 2, attack, base_version=1))
    clock.now += 61  # past the soft deadline: the lone update is a quorum here
    assert averager.tick().status == "CLOSED"

    closed = store.get("test", 2)
    assert closed is not None and closed.summary["clipped"] == ["attacker"]
    model = _model(stack, 2)
    change = torch.sqrt(sum(((model[n] - base[n]).double() ** 2).sum() for n in base))
    assert float(change) == pytest.approx(bound, rel=1e-4)


def test_no_client_weighs_more_than_ten_typical_ones_in_fast_clients() -> None:
    import random

    from sfl.core.selection import select_fast_clients

    candidates = [Candidate("liar", 1e-6), *(Candidate(f"c{i}", 10.0) for i in range(9))]
    rng = random.Random(0)
    picks = [select_fast_clients(candidates, 1, rng)[0] for _ in range(2000)]

    # weight 1 (floored at a tenth of the typical 10 s) against 9 x 0.1: about half the picks
    assert 0.45 * 2000 < picks.count("liar") < 0.6 * 2000


@pytest.mark.parametrize(
    "key",
    [
        "updates/a/round-000001.safetensors\n",
        "updates/a/round-0000001.safetensors",
        "updates/a/round-\u0660\u0660\u0660\u0660\u0660\u0661.safetensors",
        "updates/a\n/round-000001.safetensors",
    ],
)
def test_only_the_rounds_exact_key_names_an_update(key: str) -> None:
    with pytest.raises(layout.MalformedKeyError):
        layout.parse_update_key(key)


def test_metadata_integers_and_names_are_matched_whole() -> None:
    meta = dict(stack_meta("a"))
    for field, value in (("round", "1\n"), ("bytes_down", "-5"), ("metrics", '{"loss\\n": 1}')):
        with pytest.raises(codec.CodecError):
            codec.UpdateMetadata.from_header({**meta, field: value})


def test_in_the_first_round_one_of_two_devices_cannot_decide_the_model(stack: Stack) -> None:
    """No earlier bound and too few changes for a median: two changes are bounded by the
    smaller, so the x1000 update moves the model as the honest one does, by d."""
    averager, _, store = _setup(stack, "honest", "attacker", quorum="all_answered")
    _deliver(averager, stack.upload_update("honest", 1, _moved(1.0), num_examples=10))
    _deliver(averager, stack.upload_update("attacker", 1, _moved(1000.0), num_examples=10))

    round_ = store.get("test", 1)
    assert round_ is not None and round_.summary["clipped"] == ["attacker"]
    for name, expected in _moved(1.0).items():  # (d + d) / 2
        assert torch.allclose(_model(stack, 1)[name], expected, atol=1e-5), name


def test_a_lone_first_update_changes_the_model_by_at_most_four_times_its_norm(
    stack: Stack,
) -> None:
    averager, _, store = _setup(stack, "attacker", quorum="all_answered")
    _deliver(averager, stack.upload_update("attacker", 1, _moved(1000.0)))

    round_ = store.get("test", 1)
    assert round_ is not None and round_.summary["clipped"] == ["attacker"]
    model = _model(stack, 1)
    change = torch.sqrt(sum(((model[n] - TINY_MODEL[n]).double() ** 2).sum() for n in model))
    base = torch.sqrt(sum((t.double() ** 2).sum() for t in TINY_MODEL.values()))
    assert float(change) == pytest.approx(4.0 * float(base), rel=1e-4)
