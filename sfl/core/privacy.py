"""User-level differential privacy for the averager's step: the numbers, torch-free.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR
2018): each sampled device's change from the base model is clipped to an L2 bound ``clip``,
the clipped changes are summed, Gaussian noise of standard deviation ``noise_multiplier x
clip`` is added to the sum once, and the sum is divided by the expected number of devices
(a public number, never the count that answered). One device then moves the released sum by
at most ``clip`` (add or remove one device), so the step is the sampled Gaussian mechanism
that ``sfl.learning.accountant`` accounts for.

The clip may follow a target quantile of the changes' norms (Andrew et al., "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021): each device contributes one bit,
whether its change was within the clip; the bits' sum is released with its own Gaussian noise,
and the clip moves geometrically towards the quantile. Releasing the bits costs privacy too:
the noise on the sum of changes is raised so that the two releases together cost what one
release at the configured ``noise_multiplier`` would (``split_noise``). Pure functions,
shared by the averager and the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def default_delta(population: int) -> float:
    """``1 / N**1.1`` for a population of N devices: below 1/N, as a meaningful delta must be."""
    if population < 1:
        raise ValueError(f"a population must have at least one device, got {population}")
    return float(population**-1.1)


@dataclass(frozen=True)
class NoiseSplit:
    """The noise multipliers of the two releases that together cost ``total``'s privacy."""

    changes: float  # on the clipped changes' sum: standard deviation = changes x clip
    bits: float  # standard deviation of the noise on the sum of the clip bits (0: no bits)


def split_noise(total: float, bits_stddev: float) -> NoiseSplit:
    """Split a noise multiplier between the changes' sum and the clip bits' sum.

    A bit moves by 1 (within the clip or not), centred as ``bit - 1/2``: sensitivity 1/2. The
    two Gaussian releases compose like one with ``total**-2 = changes**-2 + (2 bits)**-2``
    (Andrew et al., Theorem 1), so ``changes = (total**-2 - (2 bits)**-2) ** -1/2``. With
    ``bits_stddev`` 0 the clip is fixed and no bit is released.
    """
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"noise multiplier must be a finite number > 0, got {total}")
    if bits_stddev == 0:
        return NoiseSplit(changes=total, bits=0.0)
    if not (math.isfinite(bits_stddev) and bits_stddev > 0):
        raise ValueError(f"clip bits' noise must be a finite number >= 0, got {bits_stddev}")
    remaining = total**-2 - (2.0 * bits_stddev) ** -2
    if remaining <= 0:
        raise ValueError(
            f"the clip bits' noise {bits_stddev} leaves no privacy for the changes at noise "
            f"multiplier {total}: it must exceed {total / 2.0:.4g}"
        )
    return NoiseSplit(changes=remaining**-0.5, bits=bits_stddev)


def default_bits_stddev(expected_devices: float) -> float:
    """The clip bits' noise Andrew et al. recommend: the expected devices per step / 20."""
    return expected_devices / 20.0


def next_clip(
    clip: float,
    noisy_bits: float,
    expected_devices: float,
    *,
    target_quantile: float,
    learning_rate: float,
) -> float:
    """The clip after one step: ``clip x exp(-lr x (fraction within - target))``.

    ``noisy_bits`` is the released (noised) count of changes that were within the clip;
    divided by the expected number of devices it estimates the fraction within, which the
    geometric update drives towards ``target_quantile``.
    """
    if not (0.0 <= target_quantile <= 1.0):
        raise ValueError(f"target quantile must be in [0, 1], got {target_quantile}")
    if not (expected_devices > 0 and clip > 0):
        raise ValueError("the clip and the expected number of devices must be > 0")
    within = noisy_bits / expected_devices
    return float(clip * math.exp(-learning_rate * (within - target_quantile)))


CLIPPINGS = ("fixed", "adaptive")


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    """How one DP step is taken: the configured noise and clip (``dp_*`` keys)."""

    noise_multiplier: float  # the step's total: what the accountant is told
    clip: float  # the fixed clip, or the adaptive clip's starting value
    clipping: str = "fixed"
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    bits_stddev: float = 0.0  # adaptive only; 0: default_bits_stddev(expected devices)

    def __post_init__(self) -> None:
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"unknown DP clipping {self.clipping!r}: one of fixed, adaptive")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"DP clip must be a finite number > 0, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"DP noise multiplier must be a finite number > 0, got {self.noise_multiplier}"
            )

    def split(self, expected_devices: float) -> NoiseSplit:
        """This step's noise on the changes and on the clip bits."""
        if self.clipping == "fixed":
            return split_noise(self.noise_multiplier, 0.0)
        bits = self.bits_stddev or default_bits_stddev(expected_devices)
        return split_noise(self.noise_multiplier, bits)
