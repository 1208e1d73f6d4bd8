"""Acceptance is idempotent, bad updates are recorded and skipped, one aggregation per round."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from sfl.core import layout
from sfl.core import prices as sfl_prices
from sfl.learning import codec
from sfl.local.lambdas import LocalFunction
from sfl.server.initiator import start_round
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import TINY_MODEL, Stack


@pytest.fixture
def averager() -> LocalFunction:
    return LocalFunction("averager")


def _open_round(stack: Stack, *clients: str) -> RoundStore:
    stack.put_model(0, TINY_MODEL)
    stack.register(*clients)
    assert start_round(stack.clients, stack.names, stack.config).started
    return RoundStore(stack.clients.dynamodb, stack.names.rounds_table)


def _model_versions(stack: Stack, version: int) -> int:
    """How many times the key of this model version was written (the bucket is versioned)."""
    listing = stack.clients.s3.list_object_versions(
        Bucket=stack.names.models_bucket, Prefix=layout.model_key(version)
    )
    return len(listing.get("Versions", []))


def _scaled(factor: float) -> dict[str, torch.Tensor]:
    return {name: t * factor for name, t in TINY_MODEL.items()}


def test_same_update_delivered_three_times_is_accepted_once(
    stack: Stack, averager: LocalFunction
) -> None:
    store = _open_round(stack, "a", "b")
    event = stack.upload_update("a", 1, _scaled(2.0))

    results = [averager.invoke(event)["outcomes"][0]["result"] for _ in range(3)]

    assert results == ["accepted", "duplicate", "duplicate"]
    round_ = store.get("test", 1)
    assert round_ is not None and list(round_.answers) == ["a"] and round_.other_rejections == ()
    assert round_.status is RoundState.OPEN  # b has not answered yet


def test_quorum_closes_the_round_with_the_weighted_average(
    stack: Stack, averager: LocalFunction
) -> None:
    # Bounds loose enough to leave these two updates whole (3x the median claim, 2x the
    # smaller change): the weighted average itself.
    stack.config = stack.config.replace(max_weight_ratio=3.0, norm_bound_factor=2.0)
    store = _open_round(stack, "a", "b")
    averager.invoke(
        stack.upload_update(
            "a", 1, _scaled(2.0), num_examples=10, metrics={"loss": 1.0, "accuracy": 0.2}
        )
    )
    averager.invoke(
        stack.upload_update(
            "b", 1, _scaled(2.5), num_examples=30, metrics={"loss": 0.2, "accuracy": 0.6}
        )
    )

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED and round_.model_version == 1
    body = stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.model_key(1))[
        "Body"
    ].read()
    model = codec.decode(body)
    # (10 * 2x + 30 * 2.5x) / 40 = 2.375x
    assert torch.allclose(model["w"], TINY_MODEL["w"] * 2.375)
    assert torch.allclose(model["b"], TINY_MODEL["b"] * 2.375)
    assert round_.summary["num_examples"] == 40
    assert round_.summary["client_accuracy"] == pytest.approx((10 * 0.2 + 30 * 0.6) / 40)


def test_a_closed_round_records_its_cost_from_what_it_measured(
    stack: Stack, averager: LocalFunction
) -> None:
    store = _open_round(stack, "a", "b")
    for client in ("a", "b"):
        averager.invoke(stack.upload_update(client, 1, _scaled(2.0), num_examples=10))

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert round_.handling_seconds > 0  # both answers' judging time, summed by the counters
    cost = round_.summary["cost"]
    prices = sfl_prices.PRICES["us-east-1"]
    items = cost["items"]
    # Two update events and one aggregation, at the averager's configured memory.
    assert cost["usage"]["lambda_invocations"]["averager"] >= 2
    assert cost["usage"]["dynamodb_wru"] > 0 and cost["usage"]["s3_get_requests"] > 0
    assert items["lambda_requests"] == pytest.approx(
        sum(cost["usage"]["lambda_invocations"].values()) * prices["lambda_request"].unit_price
    )
    # Downloads are one model per selected device, whatever the devices report.
    model_bytes = round_.summary["model_bytes"]
    assert cost["usage"]["bytes_out_internet"] >= 2 * model_bytes
    assert cost["usd"] == pytest.approx(sum(items.values()))


def test_twenty_concurrent_invocations_at_quorum_write_one_model_version(
    stack: Stack, averager: LocalFunction
) -> None:
    clients = [f"c{i:02d}" for i in range(4)]
    store = _open_round(stack, *clients)
    events = [stack.upload_update(c, 1, _scaled(i + 2.0)) for i, c in enumerate(clients)]
    # The first three land normally; the last one's event is delivered 20 times at once.
    for event in events[:3]:
        averager.invoke(event)
    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def deliver() -> None:
        barrier.wait()
        try:
            averager.invoke(events[3])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=deliver) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert round_.aggregation_attempts == 1
    assert _model_versions(stack, 1) == 1
    assert sorted(round_.accepted) == clients


def _pickle_payload() -> bytes:
    return pickle.dumps({k: v.numpy() for k, v in TINY_MODEL.items()})


def test_bad_updates_are_recorded_and_the_round_closes_on_the_honest_clients(
    stack: Stack, averager: LocalFunction
) -> None:
    store = _open_round(stack, "honest", "shapes", "nan", "pickle")
    stack.register("stranger")  # registered after selection: not in this round

    outcomes = {}
    outcomes["stranger"] = averager.invoke(stack.upload_update("stranger", 1, _scaled(9.0)))
    outcomes["shapes"] = averager.invoke(
        stack.upload_update("shapes", 1, {"w": torch.ones(3, 3), "b": torch.ones(2)})
    )
    nan = {"w": torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), "b": torch.zeros(2)}
    outcomes["nan"] = averager.invoke(stack.upload_update("nan", 1, nan))
    outcomes["pickle"] = averager.invoke(
        stack.upload_update("pickle", 1, {}, body=_pickle_payload())
    )
    averager.invoke(stack.upload_update("honest", 1, _scaled(4.0)))

    reasons = {c: o["outcomes"][0]["reason"].split(":")[0] for c, o in outcomes.items()}
    assert reasons == {
        "stranger": "not_selected",
        "shapes": "tensor_shape",
        "nan": "non_finite",
        "pickle": "not_safetensors",
    }
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert list(round_.accepted) == ["honest"]
    assert {c: a.reason.split(":")[0] for c, a in round_.rejected.items()} == {
        "shapes": "tensor_shape",
        "nan": "non_finite",
        "pickle": "not_safetensors",
    }
    assert "stranger" not in round_.answers and round_.rejection_counts == {}  # nothing written
    model = codec.decode(
        stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.model_key(1))[
            "Body"
        ].read()
    )
    assert torch.allclose(model["w"], TINY_MODEL["w"] * 4.0)  # only the honest update


def test_round_where_every_answer_is_rejected_is_abandoned_and_the_model_kept(
    stack: Stack, averager: LocalFunction
) -> None:
    store = _open_round(stack, "a")
    averager.invoke(stack.upload_update("a", 1, {}, body=b"not a model"))

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.ABANDONED
    assert "every answer was rejected" in round_.abandon_reason
    assert _model_versions(stack, 1) == 0
    # the next round starts from the same model
    stack.register("a")
    nxt = start_round(stack.clients, stack.names, stack.config)
    assert nxt.started and store.get("test", 2).base_version == 0  # type: ignore[union-attr]


def test_update_for_a_wrong_round_or_malformed_key_is_rejected(
    stack: Stack, averager: LocalFunction
) -> None:
    _open_round(stack, "a")
    wrong_round = averager.invoke(stack.upload_update("a", 7, _scaled(1.0)))
    event = stack.upload_update("a", 1, _scaled(1.0))
    event["Records"][0]["s3"]["object"]["key"] = "updates/a/model.pt"
    malformed = averager.invoke(event)

    assert wrong_round["outcomes"][0]["reason"] == "unknown_round"
    assert malformed["outcomes"][0]["reason"] == "malformed_key"


def test_bootstrap_writes_version_zero_once(stack: Stack, averager: LocalFunction) -> None:
    first = averager.invoke({"sfl": "bootstrap"})
    second = averager.invoke({"sfl": "bootstrap"})

    assert first == {"bootstrap": "written"} and second == {"bootstrap": "already present"}
    assert _model_versions(stack, 0) == 1


def test_an_update_costs_the_same_requests_whatever_the_rounds_size(stack: Stack) -> None:
    """The hot path reads the round item and the client's slot, writes one transaction and
    reads the counters back: no Query of the round's slots, at 3 clients or at 300."""
    from collections import Counter

    from tests.conftest import TRAINED
    from tests.test_deadlines import _deliver, _setup

    calls: dict[int, Counter[str]] = {}
    for size in (3, 300):
        clients = [f"c{i:03d}" for i in range(size)]
        averager, _, _ = _setup(stack, *clients, quorum="all_answered")
        seen: Counter[str] = Counter()

        def count(event_name: str, seen: Counter[str] = seen, **_: object) -> None:
            seen[event_name.rsplit(".", 1)[-1]] += 1

        events = stack.clients.dynamodb.meta.events
        events.register("before-call.dynamodb", count)
        try:
            assert _deliver(averager, stack.upload_update("c000", 1, TRAINED)) == "accepted"
        finally:
            events.unregister("before-call.dynamodb", count)
        calls[size] = seen
        stack.clients.dynamodb.delete_table(TableName=stack.names.rounds_table)  # next size
        stack.clients.dynamodb.get_waiter("table_not_exists").wait(
            TableName=stack.names.rounds_table
        )
        from sfl.core import resources

        stack.clients.dynamodb.create_table(
            **resources.create_table_request(resources.ROUNDS_TABLE, stack.names.rounds_table)
        )
    assert calls[3] == calls[300]
    assert calls[3]["Query"] == 0 and calls[3]["TransactWriteItems"] == 1
