"""Every aggregation rule through the real averager: server state written once beside the
model version, a retried aggregation reproducing the same model from it, robust rules on
bounded updates, and bad input rejected before any rule sees it.

Uploads go to the local S3 endpoint and are judged by the averager on a controlled clock;
the assertions are on the objects in S3 and the round record.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sfl.core import layout, plugins
from sfl.core.config import FederationConfig
from sfl.learning import codec
from sfl.learning.rules.aggregation import AggregationError, ListUpdates, build_rule
from sfl.local.lambdas import local_shard_invoker
from sfl.server import shards
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
    # Two changes are clipped to 2x the smaller here, so neither is cut: the rule's own sum.
    averager, _, store = _setup(
        stack, "a", "b", quorum="all_answered", aggregation="fedavgm", norm_bound_factor=2.0
    )
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
    """The attacker's reversed update is clipped to the median change, and still pulls a
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
    odd["w"][0, 0] += 1.5  # far from the others in one coordinate (clipped to the median norm)
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


# --- a user's rule, from outside this repository ---------------------------------------------

USER_RULES = '''
"""A user's own aggregation rules: one module, named by import path in the config."""

from __future__ import annotations

from dataclasses import dataclass

from sfl.core.params import RuleParams, param
from sfl.learning.rules.aggregation import Abilities, Aggregate, FedAvg, Rule, as_rows


@dataclass(frozen=True, kw_only=True)
class ShiftParams(RuleParams):
    """How far the shifted mean moves."""

    shift: float = param(0.0, "added to every averaged value", lo=-1.0, hi=1.0)


class ShiftedMean(Rule):
    """FedAvg plus a constant: its input is the weighted mean, so it sums in shards."""

    name = "shifted_mean"
    Params = ShiftParams
    params: ShiftParams
    abilities = Abilities(sums_in_shards=True)

    def aggregate(self, base, updates, state):
        averaged = FedAvg().aggregate(base, updates, None)
        if averaged is None:
            return None
        model = {k: v + self.params.shift for k, v in averaged.model.items()}
        return Aggregate(model=model, details={"shifted_by": self.params.shift})


class CoordinateMax(Rule):
    """The largest value of each coordinate: it reads all updates at once, never in shards."""

    name = "coordinate_max"
    abilities = Abilities(reads_all_at_once=True)

    def aggregate(self, base, updates, state):
        out = {k: v.clone() for k, v in base.items()}
        for chunk in updates.chunks():
            largest = chunk.values.max(dim=0).values
            as_rows(out[chunk.name])[chunk.rows] = largest.to(out[chunk.name].dtype)
        return Aggregate(model=out, details={"max_of": updates.clients()})
'''


@pytest.fixture
def user_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The module ``user_rules`` in a folder of the test's own, on ``sys.path``."""
    (tmp_path / "user_rules.py").write_text(USER_RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rules"
    sys.modules.pop("user_rules", None)


def _sharded_round(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, rule: str, params: str
) -> tuple[list[int], Any]:
    """Four clients, shards of two above two updates; every update delivered."""
    calls: list[int] = []
    local = local_shard_invoker()

    def invoke(shard: shards.Shard) -> Any:
        calls.append(shard.index)
        return local(shard)

    clients = ("a", "b", "c", "d")
    averager, _, store = _setup(
        stack,
        *clients,
        invoke_shard=invoke,
        quorum="all_answered",
        aggregation=rule,
        aggregation_params=params,
        aggregation_shard_above=2,
        aggregation_shard_size=2,
        norm_bound_factor=0.0,
    )
    for i, client in enumerate(clients):
        assert (
            _deliver(averager, stack.upload_update(client, 1, _moved(1.0 + 0.5 * i))) == "accepted"
        )
    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    return calls, closed


def test_a_users_rule_that_sums_in_shards_aggregates_a_sharded_round(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, user_rules: str
) -> None:
    calls, closed = _sharded_round(
        stack, monkeypatch, f"{user_rules}:ShiftedMean", '{"shift": 0.25}'
    )

    assert sorted(calls) == [0, 1]  # two shards of two: its ability let it shard
    assert closed.summary["shifted_by"] == 0.25  # the details it reported itself
    mean = {k: sum(_moved(1.0 + 0.5 * i)[k] for i in range(4)) / 4 for k in TINY_MODEL}
    model = _model(stack, 1)
    assert all(torch.allclose(model[k], mean[k] + 0.25, atol=1e-6) for k in TINY_MODEL)


def test_a_users_rule_that_reads_all_updates_at_once_is_never_sharded(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, user_rules: str
) -> None:
    calls, closed = _sharded_round(stack, monkeypatch, f"{user_rules}:CoordinateMax", "{}")

    assert calls == []  # above the shard threshold, yet read in one invocation
    assert closed.summary["max_of"] == ["a", "b", "c", "d"]
    model = _model(stack, 1)
    largest = {
        k: torch.stack([_moved(1.0 + 0.5 * i)[k] for i in range(4)]).amax(0) for k in TINY_MODEL
    }
    assert all(torch.equal(model[k], largest[k]) for k in TINY_MODEL)


def test_a_users_rule_checks_its_parameters_with_its_own_dataclass(user_rules: str) -> None:
    # Config cannot import a user's rule (it may need torch): it keeps the JSON, unjudged.
    FederationConfig(aggregation=f"{user_rules}:ShiftedMean", aggregation_params='{"shift": 5}')
    assert user_rules not in sys.modules

    with pytest.raises(
        AggregationError,
        match=r"aggregation 'shifted_mean': parameter 'shift' = 5 is not allowed; "
        r"allowed: a number from -1 to 1",
    ):
        build_rule(f"{user_rules}:ShiftedMean", '{"shift": 5}')
    with pytest.raises(AggregationError, match=r"unknown parameter\(s\) 'shfit'; known: shift"):
        build_rule(f"{user_rules}:ShiftedMean", '{"shfit": 0.1}')
    rule = build_rule(f"{user_rules}:ShiftedMean", '{"shift": -0.5}')
    assert rule.params == sys.modules[user_rules].ShiftParams(shift=-0.5)
    assert shards.shardable(rule)
    assert not shards.shardable(build_rule(f"{user_rules}:CoordinateMax"))


def test_a_class_that_is_not_a_rule_is_refused_by_name(user_rules: str) -> None:
    with pytest.raises(AggregationError, match="'user_rules:ShiftParams' made a ShiftParams"):
        build_rule(f"{user_rules}:ShiftParams")


def _sign_flipped_round() -> list[tuple[dict[str, torch.Tensor], float]]:
    """Ten updates of a 40-value model within the default bounds: seven honest changes (a
    shared direction plus each device's own), three of them reversed x10 (``sign_flip``)."""
    from sfl.core.config import FederationConfig
    from sfl.learning.rules.bounds import bounded_round

    generator = torch.Generator().manual_seed(30)
    base = {"w": torch.zeros(40)}
    shared = torch.randn(40, generator=generator)
    updates = []
    for i in range(10):
        change = shared + 0.8 * torch.randn(40, generator=generator)
        updates.append(({"w": (-10.0 if i < 3 else 1.0) * change}, 100))
    config = FederationConfig()
    return bounded_round(
        updates, base, max_ratio=config.max_weight_ratio, factor=config.norm_bound_factor
    )


def test_krum_configured_for_30_percent_leaves_out_three_sign_flippers_of_ten() -> None:
    """``byzantine_fraction`` 0.3 (the threat table's 30% row) keeps the seven honest
    updates only; the default 0.2 keeps eight, so one reversed update gets in."""
    bounded = _sign_flipped_round()
    for fraction, flipped_kept in ((0.3, 0), (0.2, 1)):
        rule = build_rule("krum", json.dumps({"byzantine_fraction": fraction}))
        result = rule.aggregate({"w": torch.zeros(40)}, ListUpdates(bounded), None)
        assert result is not None and result.details is not None
        kept = result.details["krum_kept"]
        assert len([c for c in kept if int(c) < 3]) == flipped_kept, (fraction, kept)
        assert len([c for c in kept if int(c) >= 3]) == 7


def test_krum_at_the_30_percent_row_keeps_five_honest_updates_of_ten() -> None:
    """The threat table's 30% setting (``byzantine_fraction`` 0.4, ``keep`` 5): a margin
    over three hostile of ten, and half the round averaged, so a sign flipper that looks
    typical among diverse first-round updates is less likely to be among those kept."""
    bounded = _sign_flipped_round()
    rule = build_rule("krum", json.dumps({"byzantine_fraction": 0.4, "keep": 5}))
    result = rule.aggregate({"w": torch.zeros(40)}, ListUpdates(bounded), None)
    assert result is not None and result.details is not None
    kept = result.details["krum_kept"]
    assert len(kept) == 5 and all(int(c) >= 3 for c in kept), kept
    assert result.details["krum_byzantine"] == 4
