"""Sharded aggregation: the same model as one invocation, exactly once under retries."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sfl.core import layout
from sfl.learning import codec
from sfl.learning.rules.aggregation import fedavg
from sfl.local.emulator import lambda_environment
from sfl.local.lambdas import LocalFunction, local_shard_invoker
from sfl.server import shards
from sfl.server.initiator import start_round
from sfl.server.round_updates import Entry
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import TINY_MODEL, Stack
from tests.test_deadlines import _deliver, _setup

CLIENTS = ("a", "b", "c", "d", "e")


def _moved(i: int) -> dict[str, torch.Tensor]:
    return {k: t + 0.1 * (i + 1) * torch.ones_like(t) for k, t in TINY_MODEL.items()}


def _partials(stack: Stack) -> dict[str, str]:
    listing = stack.clients.s3.list_objects_v2(
        Bucket=stack.names.models_bucket, Prefix=shards.PARTIALS_PREFIX
    )
    return {o["Key"]: o["ETag"] for o in listing.get("Contents", [])}


def _model(stack: Stack, version: int) -> dict[str, torch.Tensor]:
    body = stack.clients.s3.get_object(
        Bucket=stack.names.models_bucket, Key=layout.model_key(version)
    )["Body"].read()
    return codec.decode(body)


def _round_to_quorum(stack: Stack, monkeypatch: pytest.MonkeyPatch, invoke: Any) -> Any:
    """Five clients, shards of two (three shards); delivering the last update aggregates."""
    averager, clock, store = _setup(
        stack,
        *CLIENTS,
        invoke_shard=invoke,
        quorum="all_answered",
        aggregation_shard_above=2,
        aggregation_shard_size=2,
        norm_bound_factor=0.0,
    )
    for i, client in enumerate(CLIENTS[:-1]):
        assert _deliver(averager, stack.upload_update(client, 1, _moved(i))) == "accepted"
    return averager, clock, store


def _expected() -> dict[str, torch.Tensor]:
    result = fedavg((_moved(i), 10.0) for i in range(len(CLIENTS)))
    assert result is not None
    return result


def _local_recording(calls: list[Any]) -> shards.Invoker:
    local = local_shard_invoker()

    def invoke(shard: shards.Shard) -> Any:
        calls.append(result := local(shard))
        return result

    return invoke


def test_a_sharded_round_makes_the_unsharded_model(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    averager, _, store = _round_to_quorum(stack, monkeypatch, _local_recording(calls))
    _deliver(averager, stack.upload_update("e", 1, _moved(4)))
    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert closed.summary["participants"] == 5
    assert [c["written"] for c in calls] == [True, True, True]
    assert len(_partials(stack)) == 3
    model, expected = _model(stack, 1), _expected()
    for name, t in expected.items():
        assert model[name].dtype == t.dtype
        assert torch.allclose(model[name], t, rtol=0, atol=1e-6), name


def test_a_shard_run_twice_writes_its_partial_sum_once(stack: Stack) -> None:
    stack.put_model(0, TINY_MODEL)
    events = [stack.upload_update(c, 1, _moved(i)) for i, c in enumerate(CLIENTS[:2])]
    entries = [
        Entry(c, layout.update_key(c, 1), e["Records"][0]["s3"]["object"]["eTag"], 1.0)
        for c, e in zip(CLIENTS, events, strict=False)
    ]
    (shard,) = shards.plan("test", 1, 0, entries, size=10)
    header = codec.parse_header(codec.encode_model(TINY_MODEL, version=0))
    args = (stack.clients.s3, stack.names.updates_bucket, stack.names.models_bucket)
    first = shards.sum_shard(*args, TINY_MODEL, header, shard)
    etag = _partials(stack)[shard.key]
    second = shards.sum_shard(*args, TINY_MODEL, header, shard)
    assert first["written"] is True and second["written"] is False
    assert _partials(stack) == {shard.key: etag}
    # A different set of entries (another attempt's plan) never reads this partial sum.
    other = shards.plan("test", 1, 0, entries[:1], size=10)[0]
    assert other.key != shard.key


def test_a_shard_killed_before_writing_is_rerun_and_the_round_closes_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    local = _local_recording(calls)
    killed: list[int] = []

    def invoke(shard: shards.Shard) -> Any:
        if shard.index == 1 and not killed:
            killed.append(shard.index)
            raise shards.ShardFailed("killed before writing (timeout)")
        return local(shard)

    averager, clock, store = _round_to_quorum(stack, monkeypatch, invoke)
    with pytest.raises(shards.ShardFailed):
        _deliver(averager, stack.upload_update("e", 1, _moved(4)))
    stuck = store.get("test", 1)
    assert stuck is not None and stuck.status is RoundState.AGGREGATING
    written_first = _partials(stack)
    assert len(written_first) == 2  # shards 0 and 2; shard 1 wrote nothing

    clock.now += stack.config.aggregation_lease_seconds + 1  # the lease expires: retry
    averager.tick()
    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert closed.summary["participants"] == 5
    partials = _partials(stack)
    assert len(partials) == 3 and all(partials[k] == v for k, v in written_first.items())
    assert sorted(c["written"] for c in calls) == [False, False, True, True, True]
    model, expected = _model(stack, 1), _expected()
    assert all(torch.allclose(model[k], t, rtol=0, atol=1e-6) for k, t in expected.items())


def test_a_reduce_retried_after_the_model_was_written_keeps_that_model(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    averager, clock, store = _round_to_quorum(stack, monkeypatch, _local_recording(calls))
    original_close = RoundStore.close
    crashed: list[bool] = []

    def close_once(self: RoundStore, *args: Any, **kwargs: Any) -> bool:
        if not crashed:
            crashed.append(True)
            raise TimeoutError("killed after writing the model, before closing the round")
        return original_close(self, *args, **kwargs)

    monkeypatch.setattr(RoundStore, "close", close_once)
    with pytest.raises(TimeoutError):
        _deliver(averager, stack.upload_update("e", 1, _moved(4)))
    first_model = stack.clients.s3.head_object(
        Bucket=stack.names.models_bucket, Key=layout.model_key(1)
    )["ETag"]

    clock.now += stack.config.aggregation_lease_seconds + 1
    averager.tick()
    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert closed.summary["model_already_written"] is True
    assert (
        stack.clients.s3.head_object(Bucket=stack.names.models_bucket, Key=layout.model_key(1))[
            "ETag"
        ]
        == first_model
    )
    assert [c["written"] for c in calls] == [True, True, True, False, False, False]


def test_robust_rules_are_not_sharded() -> None:
    from sfl.learning.rules.aggregation import build_rule

    assert shards.shardable(build_rule("fedavg")) and shards.shardable(build_rule("fedadam"))
    assert not any(shards.shardable(build_rule(r)) for r in ("median", "trimmed_mean", "krum"))


@pytest.mark.parametrize("rule", ["fedavg", "fedadam", "fedavgm"])
def test_partial_sums_give_the_rules_their_unsharded_result(rule: str) -> None:
    from sfl.learning.rules.aggregation import FedAvg, ListUpdates, build_rule

    updates = [(_moved(i), float(3 + i)) for i in range(5)]

    class Partials:
        def partial_sums(self) -> Any:
            for part in (updates[:2], updates[2:4], updates[4:]):
                aggregator = FedAvg()
                for tensors, weight in part:
                    aggregator.add(tensors, weight)
                yield aggregator.partial()

    whole = build_rule(rule).aggregate(TINY_MODEL, ListUpdates(updates), None)
    sharded = build_rule(rule).aggregate(TINY_MODEL, Partials(), None)  # type: ignore[arg-type]
    assert whole is not None and sharded is not None
    for name, t in whole.model.items():
        assert sharded.model[name].dtype == t.dtype
        assert torch.allclose(sharded.model[name], t, rtol=0, atol=1e-6), name


def test_local_mode_hands_the_averager_handler_its_in_process_shard_function(
    stack: Stack,
) -> None:
    """No invoker is sniffed from the environment: the handler is given one, and local mode
    gives it the shard handler called in-process, so a large round is summed in shards."""
    stack.config = stack.config.replace(
        quorum="all_answered",
        aggregation_shard_above=2,
        aggregation_shard_size=2,
        norm_bound_factor=0.0,
    )
    with lambda_environment(stack.env()):
        stack.put_model(0, TINY_MODEL)
        stack.register(*CLIENTS)
        assert start_round(stack.clients, stack.names, stack.config).started
        averager = LocalFunction("averager")
        for i, client in enumerate(CLIENTS):
            averager.invoke(stack.upload_update(client, 1, _moved(i)))

    closed = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert closed.summary["participants"] == 5
    assert len(_partials(stack)) == 3
    model, expected = _model(stack, 1), _expected()
    assert all(torch.allclose(model[k], t, rtol=0, atol=1e-6) for k, t in expected.items())
