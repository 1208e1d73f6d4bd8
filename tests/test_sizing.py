"""The averager's size from the model and the rule (sfl.core.sizing), as cdk synth derives it.

Pure arithmetic: a robust rule's /tmp grows with the updates of a round, a streaming rule's
memory does not, explicit settings are checked against the need, and what cannot fit in
Lambda is refused with the numbers. The torch-free tables (which built-in rule reads all
updates at once, each built-in task's model size) are checked against the torch side here.
"""

from __future__ import annotations

import re

import pytest

from sfl.core import sizing
from sfl.core.config import ConfigError
from sfl.core.deployment import StackConfig
from sfl.core.params import RULES

RESNET18_BYTES = 46_796_608  # 11.7 M float32 parameters and the batch-norm counters


def stack(sfl: dict[str, object], sfl_infra: dict[str, object]) -> StackConfig:
    context = {"sfl": sfl, "sfl_infra": sfl_infra}
    return StackConfig.from_context(context.get)


def test_a_robust_rule_gets_ephemeral_storage_for_every_update_of_a_round():
    need = sizing.averager_need(model_bytes=RESNET18_BYTES, updates=100, rule="median", in_flight=4)
    assert need.ephemeral_mib * sizing.MIB >= 100 * RESNET18_BYTES
    assert need.ephemeral_mib <= sizing.MAX_EPHEMERAL_MIB


def test_a_streaming_rule_needs_the_same_memory_and_no_disk_whatever_the_round():
    ten, thousand = (
        sizing.averager_need(model_bytes=RESNET18_BYTES, updates=n, rule="fedavg", in_flight=4)
        for n in (10, 1000)
    )
    assert ten.memory_mb == thousand.memory_mb
    assert ten.ephemeral_mib == thousand.ephemeral_mib == sizing.MIN_EPHEMERAL_MIB
    assert thousand.timeout_seconds > ten.timeout_seconds


def test_sharding_bounds_one_invocation_of_a_rule_that_sums_in_shards():
    plain = sizing.averager_need(
        model_bytes=RESNET18_BYTES, updates=2000, rule="fedavg", in_flight=4
    )
    sharded = sizing.averager_need(
        model_bytes=RESNET18_BYTES,
        updates=2000,
        rule="fedavg",
        in_flight=4,
        shard_above=250,
        shard_size=250,
    )
    assert plain.timeout_seconds > sizing.MAX_TIMEOUT_SECONDS >= sharded.timeout_seconds


def test_a_rule_named_by_import_path_is_sized_for_the_worst():
    needs = sizing.RuleNeeds.of("my_rules.robust:Mine")
    assert needs.reads_all_at_once and needs.stateful and not needs.sums_in_shards


def test_derived_size_is_at_least_the_stacks_defaults_for_a_small_model():
    config = stack({"task": "digits"}, {})
    assert config.averager.memory_mb == 2048
    assert config.averager.ephemeral_mib == 512
    assert config.averager.timeout_seconds == 300


def test_a_robust_rule_with_a_45_mb_model_and_100_clients_is_sized_to_hold_them():
    config = stack(
        {"aggregation": "trimmed_mean", "clients_per_round": 100, "aggregation_lease_seconds": 900},
        {"model_bytes": RESNET18_BYTES},
    )
    assert config.averager.ephemeral_mib * sizing.MIB >= 100 * RESNET18_BYTES
    assert 2048 <= config.averager.memory_mb <= sizing.MAX_MEMORY_MB
    assert config.averager.timeout_seconds <= 900


def test_what_cannot_fit_in_lambda_is_refused_with_the_numbers():
    with pytest.raises(ConfigError) as refused:
        stack(
            {"aggregation": "krum", "clients_per_round": 1000},
            {"model_bytes": RESNET18_BYTES},
        )
    message = str(refused.value)
    assert "1000 updates" in message and "44.6 MiB model" in message
    assert re.search(
        r"ephemeral storage \(/tmp\) 469\d\d MiB \(Lambda.s most: 10240 MiB\)", message
    )


def test_an_explicit_setting_below_the_need_is_refused_with_both_numbers():
    with pytest.raises(ConfigError, match=r"averager_ephemeral_mib: 1024 MiB is less .* 4751"):
        stack(
            {"aggregation": "median", "clients_per_round": 100, "aggregation_lease_seconds": 900},
            {"model_bytes": RESNET18_BYTES, "averager_ephemeral_mib": 1024},
        )


def test_an_explicit_setting_above_the_need_wins():
    config = stack({}, {"averager_memory_mb": 4096, "averager_ephemeral_mib": 2048})
    assert (config.averager.memory_mb, config.averager.ephemeral_mib) == (4096, 2048)


def test_a_need_longer_than_the_lease_names_the_lease_to_set():
    with pytest.raises(ConfigError, match=r"needs \d+ s .* sfl.aggregation_lease_seconds \(300\)"):
        stack(
            {"aggregation": "median", "clients_per_round": 100},
            {"model_bytes": RESNET18_BYTES},
        )


def test_a_spooling_rule_of_a_task_of_unknown_size_asks_for_its_size(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delitem(sizing.BUILTIN_MODEL_BYTES, "mnist")  # as a task with parameters
    with pytest.raises(ConfigError, match=r"sfl_infra.model_bytes.*sfl task check --task mnist"):
        stack({"aggregation": "median", "task": "mnist"}, {})
    streaming = stack({"aggregation": "fedavg", "task": "mnist"}, {})
    assert streaming.averager.memory_mb == 2048  # its memory does not depend on the updates


def test_the_torch_free_tables_agree_with_the_rules_and_tasks():
    from sfl.learning import codec
    from sfl.learning.rules.aggregation import build_rule
    from sfl.learning.tasks import load_task

    for name in RULES:
        abilities = build_rule(name, "{}").abilities
        needs = sizing.RuleNeeds.of(name)
        assert needs.reads_all_at_once == abilities.reads_all_at_once, name
        assert needs.sums_in_shards == abilities.sums_in_shards, name
        assert needs.stateful == abilities.stateful, name
    for name in sizing.BUILTIN_MODEL_BYTES:
        model = load_task(name).build_model(seed=0)
        size = len(codec.encode_model(model.state_dict(), version=0, seed=0))
        assert sizing.BUILTIN_MODEL_BYTES[name] == size, name
