"""The Gaussian noise of DP-FedAvg, added once to the sum of the clipped changes.

The averager sums the sampled devices' updates with weight 1 each, every change from the base
model already clipped to the DP clip (``sfl.learning.rules.bounds.clip_scale``), into a
``PartialSum``. ``private_sum`` turns that sum into the one DP-FedAvg releases: Gaussian noise
on every floating-point tensor, and the total weight set to the expected number of devices
(devices that were sampled but did not answer count as no change), so that any rule that sums
in shards (FedAvg and the server optimisers) takes the noised mean as its input. The noise
comes from the operating system's randomness (``secrets``): no one can recompute it, not
even from a configured seed. Integer tensors (counters) carry the base model's value in every
update (``keeps_base_value``) and stay the base model's.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sfl.core.privacy import NoiseSplit, PrivacySettings, next_clip
from sfl.learning.rules.aggregation import AggregationError, PartialSum, PartialSums


def secret_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's randomness."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def private_sum(
    clipped: PartialSum,
    base: Mapping[str, torch.Tensor],
    *,
    expected_devices: float,
    stddev: float,
    generator: torch.Generator,
) -> PartialSum:
    """The released sum: ``sum(clipped changes) + N(0, stddev**2) + expected x base``, with
    total weight ``expected_devices``, whose mean is ``base + (sum of changes + noise) /
    expected_devices``.

    ``clipped`` must hold the sum of whole models (base + clipped change) with weight 1 each:
    its ``count`` devices contribute ``count x base`` that the fixed denominator replaces.
    """
    if not expected_devices > 0:
        raise ValueError(f"expected devices must be > 0, got {expected_devices}")
    if not stddev >= 0:
        raise ValueError(f"noise standard deviation must be >= 0, got {stddev}")
    if clipped.count and abs(clipped.weight - clipped.count) > 1e-9 * clipped.count:
        raise ValueError(
            f"DP sums need weight 1 per update: {clipped.count} updates weigh {clipped.weight}"
        )
    missing = expected_devices - clipped.count  # negative if more answered than expected
    sums: dict[str, torch.Tensor] = {}
    for name, start in base.items():
        total = clipped.sums[name].to(torch.float64) if clipped.count else None
        released = start.to(torch.float64) * missing
        if total is not None:
            released = released + total
        if start.dtype.is_floating_point and stddev > 0:
            released = released + stddev * torch.randn(
                start.shape, generator=generator, dtype=torch.float64
            )
        sums[name] = released
    dtypes = dict(clipped.dtypes) or {name: t.dtype for name, t in base.items()}
    return PartialSum(sums, float(expected_devices), clipped.count, dtypes)


def noisy_count(count: int, stddev: float, generator: torch.Generator) -> float:
    """A count released with Gaussian noise of ``stddev`` (the adaptive clip's bits)."""
    if not stddev >= 0:
        raise ValueError(f"noise standard deviation must be >= 0, got {stddev}")
    noise = torch.randn((), generator=generator, dtype=torch.float64) if stddev > 0 else 0.0
    return float(count + stddev * noise)


@dataclass(frozen=True)
class PrivateStep:
    """One DP step's release: the noised sum for the rule, and the clip for the next step."""

    released: PartialSum
    clip: float  # the clip this step used
    next_clip: float  # the same if fixed; moved towards the target quantile if adaptive
    noise: NoiseSplit
    noisy_bits: float | None  # adaptive only: the released count of changes within the clip


def private_step(
    clipped: PartialSum,
    base: Mapping[str, torch.Tensor],
    change_norms: Sequence[float],
    *,
    settings: PrivacySettings,
    clip: float,
    expected_devices: float,
    generator: torch.Generator,
) -> PrivateStep:
    """DP-FedAvg's step over updates already clipped to ``clip`` and summed with weight 1.

    ``change_norms`` are the summed updates' change norms before clipping (measured by the
    server): the adaptive clip's bits count those within ``clip``. The averager and the
    benchmarks call this one function.
    """
    if len(change_norms) != clipped.count:
        raise ValueError(f"{len(change_norms)} norms for {clipped.count} summed updates")
    noise = settings.split(expected_devices)
    released = private_sum(
        clipped,
        base,
        expected_devices=expected_devices,
        stddev=noise.changes * clip,
        generator=generator,
    )
    if settings.clipping == "fixed":
        return PrivateStep(released, clip, clip, noise, None)
    within = sum(1 for n in change_norms if n <= clip)
    bits = noisy_count(within, noise.bits, generator)
    following = next_clip(
        clip,
        bits,
        expected_devices,
        target_quantile=settings.target_quantile,
        learning_rate=settings.clip_learning_rate,
    )
    return PrivateStep(released, clip, following, noise, bits)


class OneRelease(PartialSums):
    """A DP step's one released sum, as the updates a rule that sums in shards receives;
    the individual updates are never offered (as in a sharded round)."""

    def __init__(self, released: PartialSum) -> None:
        self.released = released

    def partial_sums(self) -> Iterator[PartialSum]:
        yield self.released

    def stream(self, indices: Sequence[int] | None = None) -> Iterator[Any]:
        raise AggregationError("a DP step offers its one noised sum only (FedAvg, FedOpt)")

    def chunks(self, max_elements: int = 0) -> Iterator[Any]:
        raise AggregationError("a DP step offers its one noised sum only (FedAvg, FedOpt)")

    def weights(self) -> list[float]:
        raise AggregationError("a DP step offers its one noised sum only (FedAvg, FedOpt)")

    def clients(self) -> list[str]:
        raise AggregationError("a DP step offers its one noised sum only (FedAvg, FedOpt)")
