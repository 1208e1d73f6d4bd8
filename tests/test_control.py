"""The operator's control records: versioned runtime configuration, pause, rollback; what the
initiator does with them and what the averager reads back from a round."""

from __future__ import annotations

import json

import pytest
import torch

from sfl.core import layout
from sfl.core.config import ConfigError
from sfl.learning import codec
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.state.control import ControlConflict, ControlStore, plan_round, round_config
from sfl.state.lineage import LineageStore, restamp_model
from sfl.state.rounds import RoundStore
from tests.conftest import TINY_MODEL, Stack


def control(stack: Stack) -> ControlStore:
    return ControlStore(stack.clients.dynamodb, stack.names.rounds_table)


def test_each_change_is_a_new_version_of_overrides_on_the_deployed_config(stack: Stack):
    store = control(stack)
    first, config = store.set_config(stack.config, {"lr": "0.01"}, now=1.0, note="why")
    assert first.version == 1 and config.lr == 0.01
    second, config = store.set_config(stack.config, {"fraction": "0.5"}, unset=["lr"], now=2.0)
    assert second.version == 2 and dict(second.overrides) == {"fraction": 0.5}
    assert config.lr == stack.config.lr and config.fraction == 0.5
    history = store.config_history("test")
    assert [(v.version, dict(v.changed)) for v in history] == [
        (1, {"lr": 0.01}),
        (2, {"fraction": 0.5, "lr": None}),
    ]
    assert history[0].note == "why"


def test_a_refused_value_writes_nothing(stack: Stack):
    store = control(stack)
    with pytest.raises(ConfigError, match=r"'min_answered_fraction': 2\.0 is not allowed"):
        store.set_config(stack.config, {"min_answered_fraction": "2"}, now=1.0)
    with pytest.raises(ConfigError, match="fixed at deploy time"):
        store.set_config(stack.config, {"experiment": "other"}, now=1.0)
    with pytest.raises(ConfigError, match="unknown config key"):
        store.set_config(stack.config, {"learning_rate": "0.1"}, now=1.0)
    assert store.state("test").config_version == 0 and store.config_history("test") == []


def test_two_operators_changing_at_once_cannot_lose_an_update(stack: Stack):
    store = control(stack)
    store.set_config(stack.config, {"lr": "0.01"}, now=1.0)
    stale = store.state("test")
    store.set_config(stack.config, {"lr": "0.02"}, now=2.0)
    # The second writer read version 1 and writes as if it were still current.
    with pytest.raises(ControlConflict):
        store._transact(
            "test",
            expected_version=stale.config_version,
            update="SET config_version = :v",
            values={":v": {"N": "2"}},
            version_item={
                "experiment": {"S": "test#control"},
                "round": {"N": "2"},
            },
        )
    assert dict(store.state("test").overrides) == {"lr": 0.02}


def test_the_initiator_records_the_runtime_config_and_the_averager_judges_by_it(stack: Stack):
    stack.put_model(0, TINY_MODEL)
    stack.register("a", "b")
    control(stack).set_config(stack.config, {"lr": "0.125", "max_weight_ratio": "7"}, now=1.0)
    assert start_round(stack.clients, stack.names, stack.config).started
    record = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).get("test", 1)
    assert record is not None and record.config_version == 1
    assert record.train_config["lr"] == 0.125 and record.config["max_weight_ratio"] == 7.0
    assignment = json.loads(
        stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY)[
            "Body"
        ].read()
    )
    assert assignment["train_config"]["lr"] == 0.125  # what devices train with
    averager = Averager(stack.clients, stack.names, stack.config)
    assert averager.round_config(record).max_weight_ratio == 7.0
    assert stack.config.max_weight_ratio != 7.0


def test_round_config_of_different_rounds_never_mixes(stack: Stack):
    from dataclasses import replace

    stack.put_model(0, TINY_MODEL)
    stack.register("a")
    start_round(stack.clients, stack.names, stack.config)
    record = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).get("test", 1)
    assert record is not None
    other = replace(record, config={**record.config, "lr": 0.5})
    assert round_config(record, stack.config).lr == stack.config.lr
    assert round_config(other, stack.config).lr == 0.5
    assert round_config(replace(record, config={}), stack.config) is stack.config


def test_pause_refuses_and_a_redeploy_that_breaks_an_override_is_said(stack: Stack):
    store = control(stack)
    store.pause("test", now=1.0, reason="upgrade")
    assert plan_round(store, stack.config).refusal == "paused by the operator (sfl resume)"
    store.resume("test")
    assert plan_round(store, stack.config).refusal == ""
    store.set_config(stack.config, {"round_soft_deadline_seconds": "500"}, now=2.0)
    redeployed = stack.config.replace(round_deadline_seconds=400, round_soft_deadline_seconds=300)
    refusal = plan_round(store, redeployed).refusal
    assert "runtime config version 1 is not valid" in refusal
    assert "round_soft_deadline_seconds" in refusal and "sfl config unset" in refusal


def test_a_rollback_starts_the_next_round_from_a_restamped_copy(stack: Stack):
    stack.put_model(0, TINY_MODEL)
    stack.put_model(1, {k: v + 1 for k, v in TINY_MODEL.items()})
    stack.register("a")
    store = control(stack)
    store.request_rollback("test", 9, now=1.0)
    refused = start_round(stack.clients, stack.names, stack.config)
    assert not refused.started and refused.reason == "rollback: model version 9 does not exist"
    store.request_rollback("test", 0, now=1.0)
    assert start_round(stack.clients, stack.names, stack.config).started
    record = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).get("test", 1)
    assert record is not None and record.base_version == 2  # after every existing version
    body = stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.model_key(2))[
        "Body"
    ].read()
    assert codec.parse_header(body).metadata["version"] == "2"
    copy = codec.decode(body)
    assert all(torch.equal(copy[k], TINY_MODEL[k]) for k in TINY_MODEL)
    lineage = LineageStore(stack.clients, stack.names).get(2)
    assert lineage is not None and (lineage.kind, lineage.parent) == ("rollback", 0)
    assert store.state("test").rollback_to is None


def test_restamping_keeps_the_tensors_and_changes_only_the_header():
    original = codec.encode_model(TINY_MODEL, version=3, round=3)
    restamped = restamp_model(original, version=12, rolled_back_from=3)
    header = codec.parse_header(restamped)
    assert header.metadata == {
        "format": "sfl-model/1",
        "version": "12",
        "round": "3",
        "rolled_back_from": "3",
    }
    assert header.data_start % 8 == 0
    decoded = codec.decode(restamped)
    assert all(torch.equal(decoded[k], TINY_MODEL[k]) for k in TINY_MODEL)
    with pytest.raises(ValueError, match="not a model file"):
        restamp_model(b"\xff" * 12, version=1)
