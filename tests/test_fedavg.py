"""FedAvg arithmetic on hand-computed 2x2 cases, and the streaming invariant."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sfl.core.plugins import PluginError as StrategyError
from sfl.learning.rules.aggregation import AggregationError, FedAvg, fedavg, get_aggregator


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_unweighted_mean_of_two_2x2_updates() -> None:
    a = {"w": t([[1, 2], [3, 4]])}
    b = {"w": t([[3, 4], [5, 6]])}

    result = fedavg([(a, 1.0), (b, 1.0)])

    assert result is not None
    assert torch.equal(result["w"], t([[2, 3], [4, 5]]))


def test_weighted_by_num_examples() -> None:
    # (1*[0,0,0,0] + 3*[4,8,-4,2]) / 4 = [3,6,-3,1.5]
    a = {"w": t([[0, 0], [0, 0]])}
    b = {"w": t([[4, 8], [-4, 2]])}

    result = fedavg([(a, 1.0), (b, 3.0)])

    assert result is not None
    assert torch.equal(result["w"], t([[3, 6], [-3, 1.5]]))


def test_result_keeps_each_tensors_dtype_and_rounds_integer_buffers() -> None:
    a = {"w": t([[1, 1], [1, 1]]), "steps": torch.tensor(10, dtype=torch.int64)}
    b = {"w": t([[2, 2], [2, 2]]), "steps": torch.tensor(13, dtype=torch.int64)}

    result = fedavg([(a, 1.0), (b, 1.0)])

    assert result is not None
    assert result["w"].dtype == torch.float32
    assert result["steps"].dtype == torch.int64
    assert int(result["steps"]) == 12  # round(11.5) to even


def test_no_updates_is_no_result() -> None:
    assert fedavg([]) is None


def test_mismatched_names_or_shapes_raise() -> None:
    agg = FedAvg()
    agg.add({"w": t([[1, 2], [3, 4]])}, 1.0)
    with pytest.raises(AggregationError, match="names differ"):
        agg.add({"v": t([[1, 2], [3, 4]])}, 1.0)
    with pytest.raises(AggregationError, match="shape"):
        agg.add({"w": t([[1, 2, 3]])}, 1.0)
    with pytest.raises(AggregationError, match="weight"):
        agg.add({"w": t([[1, 2], [3, 4]])}, 0.0)


def test_strategy_lookup_by_name_and_import_path() -> None:
    assert get_aggregator("fedavg") is FedAvg
    assert get_aggregator("sfl.learning.rules.aggregation:FedAvg") is FedAvg
    with pytest.raises(StrategyError, match="allowed: fedavg"):
        get_aggregator("median-of-means")


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=4, max_size=4),
            st.integers(1, 1000),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_streaming_equals_weighted_mean_in_any_order(
    updates: list[tuple[list[float], int]],
) -> None:
    pairs = [
        ({"w": torch.tensor(v, dtype=torch.float32).reshape(2, 2)}, float(n)) for v, n in updates
    ]
    expected = sum(torch.tensor(v, dtype=torch.float64) * n for v, n in updates) / sum(
        n for _, n in updates
    )

    forward = fedavg(pairs)
    backward = fedavg(list(reversed(pairs)))

    assert forward is not None and backward is not None
    assert torch.allclose(forward["w"].double().flatten(), expected, atol=1e-4)
    # Order changes only float rounding (the sums are float64, cast to float32 once).
    assert torch.allclose(forward["w"], backward["w"], rtol=1e-6, atol=1e-6)
