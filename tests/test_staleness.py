"""The staleness weightings of buffered mode, against their published formulas."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfl.core.staleness import WEIGHTINGS, staleness_factor


def test_constant_ignores_staleness() -> None:
    assert [staleness_factor("constant", tau) for tau in (0, 1, 50)] == [1.0, 1.0, 1.0]


def test_polynomial_is_one_over_one_plus_tau_to_the_exponent() -> None:
    assert staleness_factor("polynomial", 0) == 1.0
    assert staleness_factor("polynomial", 3) == pytest.approx(0.5)  # 1 / 4 ** 0.5
    assert staleness_factor("polynomial", 7, exponent=1.0) == pytest.approx(0.125)


def test_hinge_is_flat_up_to_the_hinge_then_falls() -> None:
    flat = [staleness_factor("hinge", tau, exponent=0.5, hinge=2) for tau in (0, 1, 2)]
    assert flat == [1.0, 1.0, 1.0]
    assert staleness_factor("hinge", 4, exponent=0.5, hinge=2) == pytest.approx(0.5)


@given(
    st.sampled_from(WEIGHTINGS),
    st.integers(min_value=0, max_value=10_000),
    st.floats(min_value=0, max_value=10),
    st.integers(min_value=0, max_value=100),
)
def test_every_factor_is_in_zero_one_and_never_grows_with_staleness(
    weighting: str, tau: int, exponent: float, hinge: int
) -> None:
    now = staleness_factor(weighting, tau, exponent=exponent, hinge=hinge)
    later = staleness_factor(weighting, tau + 1, exponent=exponent, hinge=hinge)
    assert 0 < now <= 1 and math.isfinite(now)
    assert later <= now


@pytest.mark.parametrize(
    ("weighting", "tau", "kwargs", "words"),
    [
        ("polynomial", -1, {}, "staleness must be >= 0"),
        ("polynomial", 1, {"exponent": math.nan}, "exponent"),
        ("hinge", 1, {"hinge": -1}, "hinge"),
        ("linear", 1, {}, "unknown staleness weighting 'linear'"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(
    weighting: str, tau: int, kwargs: dict[str, float], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        staleness_factor(weighting, tau, **kwargs)  # type: ignore[arg-type]
