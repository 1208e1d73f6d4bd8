"""What the released versions have cost in privacy: (epsilon, delta), by Google's dp-accounting.

Each model version released under DP is one sampled Gaussian mechanism (``sfl.core.privacy``):
every device of the population was in the step with probability ``sampling_rate``,
independently of the others (Poisson sampling: the ``poisson`` selection), and the noise on
the sum of clipped changes had standard deviation ``noise_multiplier x clip``. Versions
compose; the Renyi-DP accountant turns their composition into the smallest epsilon at a given
delta (add or remove one device's data: user-level DP). Versions with different sampling rates
(the population changes) are composed as they were, one event per distinct pair.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant


@dataclass(frozen=True, order=True)
class Release:
    """One version's privacy event: the step's sampling rate and total noise multiplier."""

    sampling_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (0.0 < self.sampling_rate <= 1.0):
            raise ValueError(f"sampling rate must be in (0, 1], got {self.sampling_rate}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"noise multiplier must be a finite number > 0, got {self.noise_multiplier}"
            )


def dp_event(releases: Iterable[Release]) -> dp_accounting.DpEvent:
    """The composition of the releases as one dp-accounting event (equal releases counted)."""
    counted = sorted(Counter(releases).items())
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    r.sampling_rate, dp_accounting.GaussianDpEvent(r.noise_multiplier)
                ),
                count,
            )
            for r, count in counted
        ]
    )


def epsilon(releases: Iterable[Release], delta: float) -> float:
    """The epsilon the releases have spent at ``delta`` (0 if there are none)."""
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    listed = list(releases)
    if not listed:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event(listed))
    return float(accountant.get_epsilon(delta))
