"""Every aggregation rule through the real averager: server state written once beside the
model version, a retried aggregation reproducing the same model from it, robust rules on
bounded updates, and bad input rejected before any rule sees it.

Uploads go to the local S3 endpoint and are judged by the averager on a controlled clock;
the assertions are on the objects in S3 and the round record.
"""

from __future__ import annotations

import math

import pytest
import torch

from sfl.core import layout, plugins
from sfl.learning import codec
from sfl.learning.rules.aggregation import ListUpdates, build_rule
from sfl.server.initiator import start_round
from sfl.state.model_store import ModelStore
from sfl.state.rounds import RoundState
from tests.conftest import TINY_MODEL, TRAINED, Stack
from tests.test_deadlines import _deliver, _setup

DELTA = {name: TRAINED[name] - TINY_MODEL[name] for name in TINY_MODEL}


def _moved(by: float, base: dict[str, torch.Tensor] = TINY_MODEL) -> dict[str, torch.Tensor]:
    return {name: base[name] + by * DELTA[name] for name in base}


def _object(stack: Stack, key: str) -> dict:  # type: ignore[type-arg]
    return stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=key)


def _model(stack: Stack, version: int) -> dict[str, torch.Tensor]:
    return codec.decode(_object(stack, layout.model_key(version))["Body"].read())


def _expected(rule: str, base: dict[str, torch.Tensor], *updates: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    return build_rule(rule).aggregate(base, ListUpdates([(u, 10.0) for u in updates]), None)


def test_a_stateful_rule_writes_its_state_once_beside_the_new_version(stack: Stack) -> None:
    averager, _, store = _setup(stack, "a", "b", quorum="all_answered", aggregation="fedavgm")
    _deliver(averager, stack.upload_update("a", 1, _moved(1.0)))
    _deliver(averager, stack.upload_update("b", 1, _moved(1.5)))

    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert closed.summary["aggregation"] == "fedavgm"
    state_object = _object(stack, layout.state_key(1))
    state_bytes = state_object["Body"].read()
    header = codec.parse_header(state_bytes)
    assert header.metadata["rule"] == "fedavgm" and header.metadata["version"] == "1"
    expected = _expected("fedavgm", TINY_MODEL, _moved(1.0), _moved(1.5))
    model = _model(stack, 1)
    assert all(torch.allclose(model[k], expected.model[k]) for k in TINY_MODEL)
    assert all(torch.allclose(codec.decode(state_bytes)[k], v) for k, v in expected.state.items())


def test_the_next_round_continues_from_the_state_beside_its_base_version(stack: Stack) -> None:
    averager, clock, _ = _setup(stack, "a", quorum="all_answered", aggregation="fedavgm")
    _deliver(averager, stack.upload_update("a", 1, _moved(1.0)))
    first = _model(stack, 1)
    assert start_round(stack.clients, stack.names, stack.config, clock=clock).started

    _deliver(averager, stack.upload_update("a", 2, _moved(1.0, first), base_version=1))

    # By hand: the same two steps on one rule object, carrying its state.
    rule = build_rule("fedavgm")
    one = rule.aggregate(TINY_MODEL, ListUpdates([(_moved(1.0), 10.0)]), None)
    assert one is not None
    two = rule.aggregate(one.model, ListUpdates([(_moved(1.0, one.model), 10.0)]), one.state)
    assert two is not None and float(two.state["step"]) == 2.0  # type: ignore[index]
    second = _model(stack, 2)
    assert all(torch.allclose(second[k], two.model[k], atol=1e-6) for k in TINY_MODEL)
    # Momentum carried the model past what plain FedAvg would give (first + d).
    assert not torch.allclose(second["w"], _moved(1.0, first)["w"])


def test_a_retried_aggregation_that_finds_the_state_written_makes_the_model_from_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt dies between writing the state and the model; before the retry a
    device overwrites its update (so the retry leaves it out). The model still comes from
    the state already written, so model and state agree and nothing is written twice."""
    averager, clock, store = _setup(
        stack, "a", "b", quorum="all_answered", aggregation="fedadam", aggregation_lease_seconds=30
    )
    real_put_model = ModelStore.put_model

    def dies(self: ModelStore, version: int, body: bytes) -> bool:
        raise TimeoutError("the averager timed out after writing the state")

    monkeypatch.setattr(ModelStore, "put_model", dies)
    _deliver(averager, stack.upload_update("a", 1, _moved(1.0)))
    with pytest.raises(TimeoutError):
        _deliver(averager, stack.upload_update("b", 1, _moved(2.0)))
    monkeypatch.setattr(ModelStore, "put_model", real_put_model)
    written = _object(stack, layout.state_key(1))
    state = codec.decode(written["Body"].read())
    stack.upload_update("b", 1, _moved(7.0))  # overwritten: the retry cannot use it
    clock.now += 31

    assert averager.tick().status == "CLOSED"

    closed = store.get("test", 1)
    assert closed is not None and set(closed.summary["excluded"]) == {"b"}
    assert _object(stack, layout.state_key(1))["ETag"] == written["ETag"]
    rebuilt = build_rule("fedadam").model_from_state(TINY_MODEL, state)
    model = _model(stack, 1)
    assert all(torch.equal(model[k], rebuilt[k]) for k in TINY_MODEL)


def test_median_leaves_out_what_clipping_let_through(stack: Stack) -> None:
    """The attacker's reversed update is clipped to 2x the median change, and still pulls a
    mean; the coordinate-wise median of three honest updates and it is the honest one."""
    clients = ["h1", "h2", "h3", "attacker"]
    averager, _, store = _setup(stack, *clients, quorum="all_answered", aggregation="median")
    for client in clients[:3]:
        _deliver(averager, stack.upload_update(client, 1, _moved(1.0)))
    _deliver(averager, stack.upload_update("attacker", 1, _moved(-50.0)))

    closed = store.get("test", 1)
    assert closed is not None and closed.summary["clipped"] == ["attacker"]
    model = _model(stack, 1)
    assert all(torch.allclose(model[k], _moved(1.0)[k]) for k in TINY_MODEL)


def test_krum_names_the_clients_it_kept(stack: Stack) -> None:
    clients = ["h1", "h2", "h3", "h4", "odd"]
    averager, _, store = _setup(stack, *clients, quorum="all_answered", aggregation="krum")
    for i, client in enumerate(clients[:4]):
        _deliver(averager, stack.upload_update(client, 1, _moved(1.0 + 0.01 * i)))
    odd = {k: v.clone() for k, v in _moved(1.0).items()}
    odd["w"][0, 0] += 1.5  # far from the others in one coordinate, within the norm bound
    _deliver(averager, stack.upload_update("odd", 1, odd))

    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert closed.summary["krum_kept"] == ["h1", "h2", "h3", "h4"]


BAD_UPLOADS = {
    "non_finite": lambda: {"w": torch.full((2, 2), math.nan), "b": TRAINED["b"]},
    "tensor_shape": lambda: {"w": torch.zeros(3, 3), "b": TRAINED["b"]},
}


@pytest.mark.parametrize("rule", plugins.names("aggregation"))
def test_bad_input_is_rejected_before_any_rule_sees_it(stack: Stack, rule: str) -> None:
    clients = ["h1", "h2", "bad1", "bad2"]
    averager, _, store = _setup(
        stack, *clients, quorum="min_fraction", min_answered_fraction=0.5, aggregation=rule
    )
    _deliver(averager, stack.upload_update("bad1", 1, BAD_UPLOADS["non_finite"]()))
    _deliver(averager, stack.upload_update("bad2", 1, BAD_UPLOADS["tensor_shape"]()))
    _deliver(averager, stack.upload_update("h1", 1, _moved(1.0)))
    _deliver(averager, stack.upload_update("h2", 1, _moved(1.2)))

    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    reasons = {c: a.reason.split(":")[0] for c, a in closed.answers.items() if c[:3] == "bad"}
    assert reasons == {"bad1": "non_finite", "bad2": "tensor_shape"}
    model = _model(stack, 1)
    assert all(bool(torch.isfinite(model[k]).all()) for k in TINY_MODEL)
    assert model["w"].shape == TINY_MODEL["w"].shape
