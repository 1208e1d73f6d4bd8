"""User-level DP in the deployed system: rounds close with clipped, noised releases, every
version records what the experiment has spent, and what DP cannot account is refused.

The handlers are the real ones on the local stack (moto over HTTP); epsilon is checked
against an independent dp-accounting computation from the numbers the round recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import boto3
import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from rich.console import Console

from sfl.cli.status import _status
from sfl.core import layout
from sfl.core.privacy import default_delta
from sfl.learning import codec
from sfl.local.emulator import lambda_environment
from sfl.local.lambdas import LocalFunction
from sfl.ops.federation import Federation
from sfl.server import aggregation
from sfl.server.context import Aggregated, AveragerContext
from sfl.server.initiator import start_round
from sfl.state.control import ControlStore
from sfl.state.lineage import LineageStore
from sfl.state.model_store import ModelStore
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import TINY_MODEL, Stack

CLIENTS = ("a", "b", "c", "d")


@pytest.fixture
def averager() -> LocalFunction:
    return LocalFunction("averager")


def _private(stack: Stack, **keys: Any) -> None:
    """DP on: Poisson selection with q = 1 (every device, so a test knows who answers)."""
    settings: dict[str, Any] = {
        "selection": "poisson",
        "fraction": 1.0,
        "dp_noise_multiplier": 1.1,
        "dp_clip": 0.5,
        **keys,
    }
    stack.config = stack.config.replace(**settings)


def _changed(base: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {name: t + by for name, t in base.items()}


def _model(stack: Stack, version: int) -> dict[str, torch.Tensor]:
    return codec.decode(
        ModelStore(stack.clients.s3, stack.names.models_bucket).model_bytes(version)
    )


def _run_round(
    stack: Stack, averager: LocalFunction, number: int, shifts: dict[str, float] | None = None
) -> Any:
    """Start round ``number`` and answer it from every client (client i moves by shifts[i])."""
    result = start_round(stack.clients, stack.names, stack.config)
    assert result.started, result.reason
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    round_ = store.get("test", number)
    assert round_ is not None
    base = _model(stack, round_.base_version)
    for client in round_.selected:
        by = (shifts or {}).get(client, 0.1)
        averager.invoke(
            stack.upload_update(
                client, number, _changed(base, by), base_version=round_.base_version
            )
        )
    return store.get("test", number)


def _independent_epsilon(releases: list[tuple[float, float]], delta: float) -> float:
    """dp-accounting, called here directly: one Poisson-sampled Gaussian per version."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    for q, z in releases:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return float(accountant.get_epsilon(delta))


def _lineage(stack: Stack, version: int) -> Any:
    return LineageStore(stack.clients, stack.names).get(version)


@pytest.mark.parametrize("rule", ["fedavg", "fedadam"])
def test_private_rounds_close_and_record_epsilon_as_dp_accounting_computes_it(
    stack: Stack, averager: LocalFunction, rule: str
) -> None:
    _private(stack, aggregation=rule)
    stack.put_model(0, TINY_MODEL)
    stack.register(*CLIENTS)

    recorded = []
    for number in (1, 2, 3):
        round_ = _run_round(stack, averager, number)
        assert round_.status is RoundState.CLOSED, round_.abandon_reason
        assert round_.sampling == {"rate": 1.0, "population": 4.0, "expected": 4.0}
        recorded.append((round_.sampling["rate"], stack.config.dp_noise_multiplier))
        privacy = round_.summary["privacy"]
        delta = default_delta(4)
        assert privacy["delta"] == pytest.approx(delta)
        assert privacy["versions"] == number
        assert privacy["epsilon"] == pytest.approx(_independent_epsilon(recorded, delta), rel=1e-9)
        lineage = _lineage(stack, number)
        assert lineage is not None and lineage.privacy["epsilon"] == privacy["epsilon"]
    # Each change was clipped to 0.5 before the noise: the model moved, and not by 0.1
    # everywhere (the Gaussian noise of 1.1 x 0.5 / 4 per coordinate).
    assert not torch.equal(_model(stack, 3)["w"], TINY_MODEL["w"])


def test_every_accepted_update_weighs_one_and_is_clipped_to_the_dp_clip(
    stack: Stack, averager: LocalFunction
) -> None:
    # A tiny noise multiplier: the release is the clipped mean, give or take 1e-6.
    _private(stack, dp_noise_multiplier=1e-6, dp_clip=0.2)
    stack.put_model(0, TINY_MODEL)
    stack.register(*CLIENTS)

    round_ = _run_round(stack, averager, 1, {"a": 10.0, "b": 0.01, "c": 0.01, "d": 0.01})

    assert round_.status is RoundState.CLOSED
    # a's change (10 on each of 6 coordinates, norm 24.5) is clipped to norm 0.2; the others'
    # (norm 0.0245) are within it. Weights are 1, whatever num_examples each claimed.
    a_change = 0.2 / (6**0.5)
    expected = TINY_MODEL["w"] + (a_change + 3 * 0.01) / 4
    assert torch.allclose(_model(stack, 1)["w"], expected, atol=1e-4)
    assert round_.summary["clipped"] == ["a"]


def test_the_adaptive_clip_moves_across_rounds_and_is_carried_in_the_record(
    stack: Stack, averager: LocalFunction
) -> None:
    # Every change far within the clip: the unclipped share is ~1 > 0.5, the clip shrinks.
    _private(
        stack,
        dp_clipping="adaptive",
        dp_clip=5.0,
        dp_clip_learning_rate=0.5,
        dp_clip_bits_stddev=1.0,
    )
    stack.put_model(0, TINY_MODEL)
    stack.register(*CLIENTS)
    models = ModelStore(stack.clients.s3, stack.names.models_bucket)

    clips = []
    for number in (1, 2, 3):
        round_ = _run_round(stack, averager, number, dict.fromkeys(CLIENTS, 0.001))
        assert round_.status is RoundState.CLOSED, round_.abandon_reason
        record = models.privacy_record(number)
        assert record is not None and record.noisy_bits is not None
        clips.append((record.clip, record.next_clip))

    assert clips[0][0] == 5.0
    assert clips[1][0] == clips[0][1] and clips[2][0] == clips[1][1]  # carried over
    assert clips[2][1] < clips[0][0]  # moved towards the target quantile


def test_a_spent_budget_pauses_the_experiment_with_the_reason(
    stack: Stack, averager: LocalFunction
) -> None:
    # q = 1, z = 1.1 at delta 1/4**1.1: one version costs epsilon 0.91, two 1.79.
    _private(stack, dp_epsilon_budget=1.5)
    stack.put_model(0, TINY_MODEL)
    stack.register(*CLIENTS)

    round_ = _run_round(stack, averager, 1)

    assert round_.status is RoundState.CLOSED
    control = ControlStore(stack.clients.dynamodb, stack.names.rounds_table).state("test")
    assert control.paused and control.pause_reason.startswith("privacy budget")
    assert "dp_epsilon_budget 1.5" in control.pause_reason
    assert not start_round(stack.clients, stack.names, stack.config).started  # nothing runs
    # What the operator sees: sfl status's privacy line, and the reason it is paused.
    shown = _status_text(stack)
    assert "privacy:     epsilon 0.912 of 1.5 at delta 2.2e-01 after 1 version" in shown
    assert "PAUSED (privacy budget" in shown
    # Raising the budget and resuming goes on.
    ControlStore(stack.clients.dynamodb, stack.names.rounds_table).resume("test")
    stack.config = stack.config.replace(dp_epsilon_budget=100.0)
    assert _run_round(stack, averager, 2).status is RoundState.CLOSED


def test_a_release_past_the_budget_is_refused_before_anything_is_written(
    stack: Stack, averager: LocalFunction
) -> None:
    _private(stack, dp_epsilon_budget=0.5)  # less than one version costs
    stack.put_model(0, TINY_MODEL)
    stack.register(*CLIENTS)

    round_ = _run_round(stack, averager, 1)

    assert round_.status is RoundState.ABANDONED
    assert round_.abandon_reason.startswith("privacy budget")
    models = ModelStore(stack.clients.s3, stack.names.models_bucket)
    assert not models.has_model(1) and models.privacy_record(1) is None


def test_a_retry_after_the_record_and_before_the_model_keeps_the_record(
    stack: Stack, averager: LocalFunction, monkeypatch: pytest.MonkeyPatch
) -> None:
    _private(stack, dp_clipping="adaptive", dp_clip=1.0, dp_clip_bits_stddev=1.0)
    stack.put_model(0, TINY_MODEL)
    stack.register(*CLIENTS)

    def timed_out(self: ModelStore, version: int, body: bytes) -> bool:
        raise TimeoutError("the function timed out before the model was written")

    monkeypatch.setattr(ModelStore, "put_model", timed_out)
    with pytest.raises(TimeoutError):  # the last answer's invocation aggregates, and dies
        _run_round(stack, averager, 1)
    monkeypatch.undo()
    models = ModelStore(stack.clients.s3, stack.names.models_bucket)
    first = models.privacy_record(1)
    assert first is not None and not models.has_model(1)

    # The retry (its lease expired) finds the record and keeps it; the model is written once.
    round_ = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).get("test", 1)
    assert round_ is not None and round_.status is RoundState.AGGREGATING
    ctx = AveragerContext.build(stack.clients, stack.names, stack.config)
    aggregated = aggregation.aggregate(ctx, round_)

    assert isinstance(aggregated, Aggregated)
    assert models.privacy_record(1) == first
    assert aggregated.summary["privacy"]["next_clip"] == first.next_clip
    assert aggregated.summary["privacy"]["epsilon"] == first.epsilon
    assert models.has_model(1)


def test_a_users_own_rule_that_sums_in_shards_runs_with_dp(
    stack: Stack, averager: LocalFunction, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "private_rules"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "halfway.py").write_text(
        textwrap.dedent(
            '''
            """A user's rule: halfway from the base model to the mean."""
            from sfl.learning.rules.aggregation import Abilities, Aggregate, FedAvg, Rule


            class Halfway(Rule):
                name = "halfway"
                abilities = Abilities(sums_in_shards=True)

                def aggregate(self, base, updates, state):
                    mean = FedAvg().aggregate(base, updates, None)
                    if mean is None:
                        return None
                    return Aggregate(
                        model={n: (base[n] + mean.model[n]) / 2 for n in base}
                    )
            '''
        )
    )
    (package / "whole.py").write_text(
        textwrap.dedent(
            '''
            """A user's rule that reads single updates: DP must refuse it."""
            from sfl.learning.rules.aggregation import Abilities, Rule


            class Whole(Rule):
                name = "whole"
                abilities = Abilities(reads_all_at_once=True)

                def aggregate(self, base, updates, state):
                    raise AssertionError("never called with DP on")
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "private_rules", raising=False)
    _private(stack, aggregation="private_rules.halfway:Halfway")
    stack.put_model(0, TINY_MODEL)
    stack.register(*CLIENTS)

    round_ = _run_round(stack, averager, 1)
    assert round_.status is RoundState.CLOSED, round_.abandon_reason
    assert round_.summary["privacy"]["versions"] == 1

    stack.config = stack.config.replace(aggregation="private_rules.whole:Whole")
    refused = _run_round(stack, averager, 2)
    assert refused.status is RoundState.ABANDONED
    assert "does not sum in shards" in refused.abandon_reason
    control = ControlStore(stack.clients.dynamodb, stack.names.rounds_table).state("test")
    assert control.paused and "does not sum in shards" in control.pause_reason


def test_without_dp_the_round_records_no_privacy(stack: Stack, averager: LocalFunction) -> None:
    stack.put_model(0, TINY_MODEL)
    stack.register("a", "b")
    round_ = _run_round(stack, averager, 1)
    assert round_.status is RoundState.CLOSED
    assert "privacy" not in round_.summary and round_.sampling == {}
    assert ModelStore(stack.clients.s3, stack.names.models_bucket).privacy_record(1) is None
    lineage = _lineage(stack, 1)
    assert lineage is not None and "privacy" not in json.dumps(lineage.to_dict())


def test_a_sharded_private_round_releases_the_clipped_mean_of_its_shards(
    stack: Stack,
) -> None:
    _private(
        stack,
        dp_noise_multiplier=1e-6,
        dp_clip=0.2,
        quorum="all_answered",
        aggregation_shard_above=2,
        aggregation_shard_size=2,
    )
    with lambda_environment(stack.env()):  # the handler runs its shards in-process
        stack.put_model(0, TINY_MODEL)
        stack.register(*CLIENTS)
        round_ = _run_round(
            stack, LocalFunction("averager"), 1, {"a": 10.0, "b": 0.01, "c": 0.01, "d": 0.01}
        )

    assert round_.status is RoundState.CLOSED, round_.abandon_reason
    listing = stack.clients.s3.list_objects_v2(
        Bucket=stack.names.models_bucket, Prefix=layout.PARTIALS_PREFIX
    )
    assert listing.get("KeyCount", 0) == 2  # two shards of two
    a_change = 0.2 / (6**0.5)
    expected = TINY_MODEL["w"] + (a_change + 3 * 0.01) / 4
    assert torch.allclose(_model(stack, 1)["w"], expected, atol=1e-4)
    assert round_.summary["privacy"]["versions"] == 1


@pytest.mark.slow
def test_sfl_simulate_with_dp_writes_each_rounds_spending_to_history(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "sfl.cli.main", "simulate", "--clients", "4", "--rounds", "3",
            "--set", "selection=poisson", "--set", "dp_noise_multiplier=0.8",
            "--set", "dp_clip=2.0", "--set", "dp_clipping=adaptive",
            "--set", "dp_clip_bits_stddev=2.0", "--out", str(out),
        ],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    rounds = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["status"] for r in rounds] == ["CLOSED"] * 3
    released = [(r["sampling"]["rate"], 0.8) for r in rounds]
    for count, row in enumerate(rounds, start=1):
        privacy = row["privacy"]
        assert privacy["versions"] == count
        expected = _independent_epsilon(released[:count], privacy["delta"])
        assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert rounds[1]["privacy"]["clip"] == rounds[0]["privacy"]["next_clip"]


def _status_text(stack: Stack) -> str:
    """``sfl status`` as printed, over this stack's clients."""
    fed = Federation(stack="local", session=boto3.session.Session(), outputs={})
    fed.__dict__.update(names=stack.names, deployed_config=stack.config)
    fed._clients.update(dynamodb=stack.clients.dynamodb, s3=stack.clients.s3)
    console = Console(record=True, width=200)
    _status(fed, argparse.Namespace(json=False), console)
    return console.export_text()
