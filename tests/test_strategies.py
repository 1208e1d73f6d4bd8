"""The aggregation rules on hand-computed cases: server optimisers, median, trimmed mean, Krum.

Prepare tiny models, execute one rule, assert the tensor values. Parity with Flower's own
implementations on random inputs is in ``test_flwr_parity.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sfl.core.config import ConfigError, FederationConfig
from sfl.learning.rules import fedopt, robust
from sfl.learning.rules.aggregation import (
    AggregationError,
    ListUpdates,
    as_rows,
    build_rule,
    row_slices,
)

BASE = {"w": torch.tensor([[0.0, 0.0], [0.0, 0.0]]), "b": torch.tensor(0.0)}


def _model(w: list[list[float]], b: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "b": torch.tensor(b)}


def _updates(*models: dict[str, torch.Tensor], weight: float = 1.0) -> ListUpdates:
    return ListUpdates([(m, weight) for m in models])


# --- server optimisers --------------------------------------------------------------------


def test_fedavgm_moves_by_the_momentum_of_the_pseudo_gradient() -> None:
    rule = build_rule("fedavgm", '{"server_lr": 1.0, "server_momentum": 0.5}')
    client = _model([[1.0, 1.0], [1.0, 1.0]], 2.0)

    first = rule.aggregate(BASE, _updates(client), None)
    assert first is not None and first.state is not None
    assert torch.equal(first.model["w"], client["w"])  # momentum starts at the first step
    second = rule.aggregate(first.model, _updates(client), first.state)

    # pseudo-gradient of round 2 is 0; momentum 0.5 * (-1) carries the model on by 0.5
    assert second is not None
    assert torch.allclose(second.model["w"], torch.full((2, 2), 1.5))
    assert torch.allclose(second.model["b"], torch.tensor(3.0))
    assert float(second.state["step"]) == 2.0  # type: ignore[index]


def test_fedadam_first_step_is_eta_times_the_bias_corrected_sign() -> None:
    rule = build_rule("fedadam", '{"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9}')
    client = _model([[2.0, -2.0], [0.5, 0.0]], 1.0)

    result = rule.aggregate(BASE, _updates(client), None)

    # m = 0.1 d, v = 0.01 d^2 -> m / sqrt(v) = sign(d); rate = eta * sqrt(1-.99^2)/(1-.9^2)
    rate = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert result is not None
    expected = torch.tensor([[rate, -rate], [rate, 0.0]])
    assert torch.allclose(result.model["w"], expected, atol=1e-6)


def test_fedyogi_and_fedadagrad_take_eta_sized_first_steps() -> None:
    client = _model([[3.0, -1.0], [0.0, 1.0]], 0.0)
    for name, first_moment in (("fedyogi", 0.1), ("fedadagrad", 1.0)):
        rule = build_rule(name, '{"eta": 0.5, "tau": 1e-12}')
        result = rule.aggregate(BASE, _updates(client), None)
        assert result is not None
        second_moment_root = {"fedyogi": math.sqrt(0.01), "fedadagrad": 1.0}[name]
        step = 0.5 * first_moment / second_moment_root
        expected = torch.tensor([[step, -step], [0.0, step]])
        assert torch.allclose(result.model["w"], expected, atol=1e-6), name


def test_the_model_is_a_function_of_base_and_state_alone() -> None:
    """What lets a retried aggregation rebuild the model from the state it finds written."""
    rule = build_rule("fedadam")
    result = rule.aggregate(BASE, _updates(_model([[1.0, 2.0], [3.0, 4.0]], 5.0)), None)
    assert result is not None and result.state is not None

    rebuilt = rule.model_from_state(BASE, result.state)

    assert all(torch.equal(rebuilt[k], result.model[k]) for k in BASE)


def test_a_state_for_other_tensors_is_not_used_and_the_optimiser_starts_afresh() -> None:
    rule = fedopt.FedAvgM(server_momentum=0.9)
    foreign = {"step": torch.tensor(3.0, dtype=torch.float64), "momentum/x": torch.ones(7)}
    client = _model([[1.0, 1.0], [1.0, 1.0]], 1.0)

    result = rule.aggregate(BASE, _updates(client), foreign)

    assert result is not None and float(result.state["step"]) == 1.0  # type: ignore[index]
    assert torch.equal(result.model["w"], client["w"])


def test_a_non_finite_state_is_not_used() -> None:
    rule = fedopt.FedAvgM(server_momentum=0.9)
    first = rule.aggregate(BASE, _updates(_model([[1.0, 1.0], [1.0, 1.0]], 1.0)), None)
    assert first is not None and first.state is not None
    poisoned = dict(first.state)
    poisoned["momentum/w"] = torch.full((2, 2), math.nan, dtype=torch.float64)

    again = rule.aggregate(BASE, _updates(_model([[1.0, 1.0], [1.0, 1.0]], 1.0)), poisoned)

    assert again is not None and float(again.state["step"]) == 1.0  # type: ignore[index]


# --- robust rules ---------------------------------------------------------------------------


def test_median_takes_the_middle_value_of_each_coordinate() -> None:
    models = [
        _model([[1.0, 10.0], [0.0, 0.0]], 1.0),
        _model([[2.0, -5.0], [0.0, 1.0]], 2.0),
        _model([[1000.0, 0.0], [0.0, 2.0]], 3.0),
    ]
    result = robust.Median().aggregate(BASE, _updates(*models), None)
    assert result is not None
    assert torch.equal(result.model["w"], torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(result.model["b"], torch.tensor(2.0))


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    models = [_model([[v, 0.0], [0.0, 0.0]], v) for v in (1.0, 2.0, 4.0, 100.0)]
    result = robust.Median().aggregate(BASE, _updates(*models), None)
    assert result is not None and float(result.model["w"][0, 0]) == 3.0


def test_trimmed_mean_cuts_each_tail_before_averaging() -> None:
    values = (-100.0, 1.0, 2.0, 3.0, 100.0)
    models = [_model([[v, v], [v, v]], v) for v in values]
    result = robust.TrimmedMean(trim_fraction=0.2).aggregate(BASE, _updates(*models), None)
    assert result is not None
    assert torch.equal(result.model["w"], torch.full((2, 2), 2.0))


def test_krum_keeps_the_updates_close_to_their_neighbours() -> None:
    honest = [_model([[1.0 + d, 1.0], [1.0, 1.0]], 1.0) for d in (0.0, 0.1, -0.1, 0.05)]
    outlier = _model([[50.0, -50.0], [50.0, 50.0]], 9.0)
    rule = robust.MultiKrum(byzantine_fraction=0.2)
    updates = ListUpdates([(m, 1.0) for m in (*honest, outlier)], ["a", "b", "c", "d", "odd"])

    result = rule.aggregate(BASE, updates, None)

    assert result is not None and result.details is not None
    assert result.details == {"krum_kept": ["a", "b", "c", "d"], "krum_byzantine": 1}
    assert torch.allclose(result.model["w"], torch.tensor([[1.0125, 1.0], [1.0, 1.0]]))


def test_krum_with_keep_one_returns_the_best_update_itself() -> None:
    models = [_model([[v, 0.0], [0.0, 0.0]], 0.0) for v in (0.0, 1.0, 1.5, 30.0)]
    updates = ListUpdates([(m, 1.0) for m in models], ["c0", "c1", "c2", "c3"])
    result = robust.MultiKrum(byzantine_fraction=0.25, keep=1).aggregate(BASE, updates, None)
    assert result is not None and result.details is not None
    assert result.details["krum_kept"] == ["c1"]
    assert torch.equal(result.model["w"], models[1]["w"])


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_robust_rules_give_the_same_model_however_small_the_chunks(rule: str) -> None:
    torch.manual_seed(0)
    base = {"a": torch.zeros(5, 3), "b": torch.zeros(4), "c": torch.tensor(0.0)}
    models = [{k: torch.randn(v.shape) for k, v in base.items()} for _ in range(6)]

    class TinyChunks(ListUpdates):
        def chunks(self, max_elements: int = 0):  # type: ignore[no-untyped-def]
            return super().chunks(max_elements=1)

    whole = build_rule(rule).aggregate(base, ListUpdates([(m, 1.0) for m in models]), None)
    tiny = build_rule(rule).aggregate(base, TinyChunks([(m, 1.0) for m in models]), None)

    assert whole is not None and tiny is not None
    assert all(torch.equal(whole.model[k], tiny.model[k]) for k in base)


def test_chunks_hold_at_most_the_budget_or_one_row() -> None:
    assert list(row_slices((10, 4), 5, 40)) == [slice(0, 2), slice(2, 4), slice(4, 6),
                                                slice(6, 8), slice(8, 10)]  # fmt: skip
    assert list(row_slices((3, 1000), 5, 40)) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert list(row_slices((), 5, 40)) == [slice(0, 1)]
    assert as_rows(torch.tensor(2.0)).shape == (1,)


# --- parameters -----------------------------------------------------------------------------


def test_unknown_or_out_of_range_parameters_are_refused_with_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) 'etta'; known: eta, beta_1"):
        FederationConfig(aggregation="fedadam", aggregation_params='{"etta": 0.1}')
    with pytest.raises(ConfigError, match=r"'trim_fraction' = 0\.5 is not allowed; allowed: a num"):
        FederationConfig(aggregation="trimmed_mean", aggregation_params='{"trim_fraction": 0.5}')
    with pytest.raises(ConfigError, match="is not JSON"):
        FederationConfig(aggregation="fedadam", aggregation_params='{"eta": NaN}')
    with pytest.raises(AggregationError, match=r"'keep' = 1\.5"):
        build_rule("krum", '{"keep": 1.5}')


def test_parameters_from_cdk_json_may_be_an_object_and_are_stored_canonically() -> None:
    config = FederationConfig.from_mapping(
        {"aggregation": "fedadam", "aggregation_params": {"tau": 0.001, "eta": 0.03}}
    )
    assert config.aggregation_params == '{"eta":0.03,"tau":0.001}'
    assert FederationConfig.from_env(config.to_env()) == config


def test_sfl_config_lists_every_rules_parameters_with_default_and_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sfl.cli.main import main
    from sfl.core.params import RULES

    assert main(["config"]) == 0

    out = capsys.readouterr().out
    section = out.split("aggregation_params, per rule", 1)[1].split("\n\n", 1)[0]
    per_rule = section.splitlines()[1:]
    listed = [line.split()[:2] for line in per_rule]
    expected = [
        [rule, f.name] for rule, entry in RULES.items() for f in dataclasses.fields(entry.params)
    ]
    assert listed == expected
    assert "  fedavgm       server_momentum     0.4      a number from 0 to 0.999" in out
    assert "aggregation_params" in out and "proximal_mu" in out
