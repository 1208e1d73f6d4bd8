"""DP-FedAvg's pieces: the noised sum, the adaptive clip, the noise split and the accountant."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant

from sfl.core.privacy import PrivacySettings, default_delta, next_clip, split_noise
from sfl.learning.accountant import Release, epsilon
from sfl.learning.rules.aggregation import FedAvg
from sfl.learning.rules.privacy import (
    noisy_count,
    private_step,
    private_sum,
    secret_generator,
)


def _base() -> dict[str, torch.Tensor]:
    return {
        "w": torch.zeros(200, 500, dtype=torch.float32),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def _clipped_sum(changes: list[float]) -> FedAvg:
    """Weight-1 sum of models base + c (every float value moved by c)."""
    summed = FedAvg()
    for c in changes:
        summed.add({"w": torch.full((200, 500), c), "steps": torch.tensor(7)}, 1.0)
    return summed


def test_without_noise_the_mean_divides_the_changes_by_the_expected_devices() -> None:
    # Two answered of four expected: the missing two count as no change.
    released = private_sum(
        _clipped_sum([1.0, 3.0]).partial(),
        _base(),
        expected_devices=4.0,
        stddev=0.0,
        generator=secret_generator(),
    )
    model = FedAvg()
    model.add_partial(released)
    result = model.result()
    assert result is not None
    assert torch.allclose(result["w"], torch.full((200, 500), 1.0))  # (1 + 3) / 4
    assert int(result["steps"]) == 7  # a counter keeps the base value
    assert released.count == 2 and released.weight == 4.0


def test_the_noise_has_the_standard_deviation_asked_for_on_floats_only() -> None:
    stddev = 0.5
    released = private_sum(
        _clipped_sum([2.0]).partial(),
        _base(),
        expected_devices=1.0,
        stddev=stddev,
        generator=secret_generator(),
    )
    noise = released.sums["w"] - 2.0
    # 100,000 draws: the sample standard deviation is within 2% of sigma with overwhelming
    # probability (its relative error is about 1 / sqrt(2n) = 0.22%).
    assert abs(float(noise.std()) - stddev) < 0.02 * stddev
    assert abs(float(noise.mean())) < 0.01
    assert float(released.sums["steps"]) == 7.0


def test_two_releases_of_the_same_sum_differ_their_noise_is_not_reproducible() -> None:
    partial = _clipped_sum([1.0]).partial()
    first, second = (
        private_sum(
            partial, _base(), expected_devices=1.0, stddev=1.0, generator=secret_generator()
        )
        for _ in range(2)
    )
    assert not torch.equal(first.sums["w"], second.sums["w"])


def test_a_sum_of_weighted_updates_is_refused() -> None:
    summed = FedAvg()
    summed.add({"w": torch.ones(3)}, 5.0)
    with pytest.raises(ValueError, match="weight 1 per update"):
        private_sum(
            summed.partial(),
            {"w": torch.zeros(3)},
            expected_devices=2.0,
            stddev=1.0,
            generator=secret_generator(),
        )


def test_noisy_count_is_the_count_plus_noise() -> None:
    generator = secret_generator()
    draws = torch.tensor([noisy_count(10, 2.0, generator) for _ in range(4000)])
    assert abs(float(draws.mean()) - 10.0) < 0.2
    assert abs(float(draws.std()) - 2.0) < 0.15
    assert noisy_count(10, 0.0, generator) == 10.0


def test_the_split_costs_what_one_release_at_the_total_costs() -> None:
    split = split_noise(1.0, 2.5)
    assert math.isclose(split.changes**-2 + (2 * split.bits) ** -2, 1.0)
    assert split.changes > 1.0  # the changes pay for the bits with more noise
    assert split_noise(1.3, 0.0).changes == 1.3
    with pytest.raises(ValueError, match="leaves no privacy"):
        split_noise(1.0, 0.5)


def test_the_bits_noise_the_split_asks_for_is_enough() -> None:
    # The changes keep some privacy only if 2 x bits > total: the refusal names total / 2,
    # and any bits' noise above it is accepted.
    with pytest.raises(ValueError, match=r"must exceed 1\.5\b"):
        split_noise(3.0, 1.0)
    assert split_noise(3.0, 1.5001).changes > 0


def test_the_adaptive_clip_moves_towards_the_target_quantile() -> None:
    # 10 of 10 within: the clip is too large and shrinks; 0 of 10: it grows; at the target it
    # stays.
    kwargs = {"target_quantile": 0.5, "learning_rate": 0.2}
    assert next_clip(1.0, 10.0, 10.0, **kwargs) == pytest.approx(math.exp(-0.1))
    assert next_clip(1.0, 0.0, 10.0, **kwargs) == pytest.approx(math.exp(0.1))
    assert next_clip(2.0, 5.0, 10.0, **kwargs) == pytest.approx(2.0)


def test_default_delta_is_below_one_over_the_population() -> None:
    assert default_delta(1000) < 1 / 1000
    assert default_delta(1000) == pytest.approx(1000**-1.1)


def test_epsilon_grows_with_versions_and_falls_with_noise() -> None:
    delta = default_delta(1000)
    one = Release(sampling_rate=0.05, noise_multiplier=1.0)
    assert epsilon([], delta) == 0.0
    e10, e100 = epsilon([one] * 10, delta), epsilon([one] * 100, delta)
    assert 0 < e10 < e100
    quieter = Release(sampling_rate=0.05, noise_multiplier=2.0)
    assert epsilon([quieter] * 100, delta) < e100


def test_epsilon_agrees_with_an_independent_accountant() -> None:
    """RDP is an upper bound; the PLD accountant of the same library is tighter, and both
    describe the same mechanism, so they agree to within RDP's known looseness."""
    delta = default_delta(1000)
    releases = [Release(0.05, 1.0)] * 60 + [Release(0.04, 1.2)] * 40
    rdp = epsilon(releases, delta)
    pld = pld_privacy_accountant.PLDAccountant()
    for rate, noise, count in ((0.05, 1.0, 60), (0.04, 1.2, 40)):
        sampled = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        pld.compose(dp_accounting.SelfComposedDpEvent(sampled, count))
    tight = pld.get_epsilon(delta)
    assert tight <= rdp <= 1.5 * tight


def test_a_release_outside_its_domain_is_refused() -> None:
    with pytest.raises(ValueError, match="sampling rate"):
        Release(sampling_rate=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        Release(sampling_rate=0.1, noise_multiplier=0.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon([Release(0.1, 1.0)], 1.0)


def test_a_fixed_step_keeps_its_clip_and_noises_with_the_whole_multiplier() -> None:
    settings = PrivacySettings(noise_multiplier=0.8, clip=0.5)
    step = private_step(
        _clipped_sum([0.001]).partial(),
        _base(),
        [0.3],
        settings=settings,
        clip=0.5,
        expected_devices=1.0,
        generator=secret_generator(),
    )
    assert step.next_clip == 0.5 and step.noisy_bits is None
    noise = step.released.sums["w"] - 0.001
    assert abs(float(noise.std()) - 0.8 * 0.5) < 0.02 * 0.4


def test_an_adaptive_step_counts_the_changes_within_its_clip_and_moves_it() -> None:
    # One of ten changes is within the clip: the clip grows towards the median. The bits'
    # noise (0.6) is 6.7 of its deviations away from reaching the target's 5 of 10.
    settings = PrivacySettings(noise_multiplier=1.0, clip=1.0, clipping="adaptive", bits_stddev=0.6)
    step = private_step(
        _clipped_sum([0.0] * 10).partial(),
        _base(),
        [0.5] + [50.0] * 9,
        settings=settings,
        clip=1.0,
        expected_devices=10.0,
        generator=secret_generator(),
    )
    assert step.noisy_bits is not None and abs(step.noisy_bits - 1.0) < 4.0
    assert step.next_clip == pytest.approx(math.exp(-0.2 * (step.noisy_bits / 10 - 0.5)))
    assert step.next_clip > 1.0
    # The changes pay for the bits: more noise than the multiplier alone.
    assert step.noise.changes == pytest.approx((1.0 - (2 * 0.6) ** -2) ** -0.5)
    with pytest.raises(ValueError, match="norms for"):
        private_step(
            _clipped_sum([0.0]).partial(),
            _base(),
            [],
            settings=settings,
            clip=1.0,
            expected_devices=1.0,
            generator=secret_generator(),
        )
