"""What each DP version released and what the experiment has spent so far: one record per version.

The averager writes a ``PrivacyRecord`` once beside every version it makes with DP on, before
the model (``sfl.state.model_store.ModelStore.put_privacy``): the clip the step used and the
clip for the next one, the noise split, the released count of unclipped changes (adaptive
clipping), the sampling the initiator really did, and the (epsilon, delta) that all DP versions
of the chain have spent, this one included. The releases so far travel from record to record
(distinct (sampling rate, noise multiplier) pairs with their counts), so no step reads the
whole history. A retried aggregation that finds the record reuses it: the next clip and the
epsilon are decided once. Torch-free: the initiator, ``sfl status`` and the lineage read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RECORD_FORMAT = "sfl-privacy/1"


@dataclass(frozen=True, kw_only=True)
class PrivacyRecord:
    """One DP version's release and the chain's spending up to and including it."""

    version: int
    clip: float  # the clip this version's changes were clipped to
    next_clip: float  # what the next version clips to (adaptive: moved; fixed: the same)
    clipping: str
    noise_multiplier: float  # the total z, what the accountant is told
    noise_changes: float  # z on the changes' sum (x clip = its standard deviation)
    noise_bits: float  # standard deviation of the noise on the unclipped count (0: fixed)
    noisy_bits: float | None  # the released unclipped count (adaptive only)
    sampling_rate: float  # q of the Poisson draw (the round's record)
    population: int  # N the draw sampled from
    expected_devices: float  # q x N: the sum's fixed denominator
    summed: int  # updates in the sum (accepted and read)
    # Every DP release of the chain so far, this one included: [q, z, count] per pair.
    releases: tuple[tuple[float, float, int], ...] = ()
    largest_population: int = 0  # the largest N of the chain, for the default delta
    delta: float
    epsilon: float  # spent by the chain so far at ``delta``
    next_epsilon: float  # what one more release at this (q, z) would make it
    first_version: int  # the chain's first DP version

    @property
    def versions(self) -> int:
        """DP versions in the chain so far."""
        return sum(count for _, _, count in self.releases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "version": self.version,
            "clip": self.clip,
            "next_clip": self.next_clip,
            "clipping": self.clipping,
            "noise_multiplier": self.noise_multiplier,
            "noise_changes": self.noise_changes,
            "noise_bits": self.noise_bits,
            "noisy_bits": self.noisy_bits,
            "sampling_rate": self.sampling_rate,
            "population": self.population,
            "expected_devices": self.expected_devices,
            "summed": self.summed,
            "releases": [list(r) for r in self.releases],
            "largest_population": self.largest_population,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "next_epsilon": self.next_epsilon,
            "first_version": self.first_version,
            "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyRecord:
        """A record we wrote (in our own bucket, never a device's); checked field by field."""
        if d.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a privacy record: format {d.get('format')!r}")
        try:
            noisy = d.get("noisy_bits")
            return cls(
                version=int(d["version"]),
                clip=float(d["clip"]),
                next_clip=float(d["next_clip"]),
                clipping=str(d["clipping"]),
                noise_multiplier=float(d["noise_multiplier"]),
                noise_changes=float(d["noise_changes"]),
                noise_bits=float(d["noise_bits"]),
                noisy_bits=None if noisy is None else float(noisy),
                sampling_rate=float(d["sampling_rate"]),
                population=int(d["population"]),
                expected_devices=float(d["expected_devices"]),
                summed=int(d["summed"]),
                releases=tuple((float(q), float(z), int(n)) for q, z, n in d["releases"]),
                largest_population=int(d.get("largest_population", d["population"])),
                delta=float(d["delta"]),
                epsilon=float(d["epsilon"]),
                next_epsilon=float(d["next_epsilon"]),
                first_version=int(d["first_version"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a privacy record: {e}") from e

    def summary(self) -> dict[str, Any]:
        """What the round's summary, the lineage, ``history.json`` and ``sfl status`` show."""
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "versions": self.versions,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "next_clip": self.next_clip,
            "sampling_rate": self.sampling_rate,
            "expected_devices": self.expected_devices,
            "population": self.population,
            "next_epsilon": self.next_epsilon,
        }


def with_release(
    releases: Sequence[tuple[float, float, int]], sampling_rate: float, noise_multiplier: float
) -> tuple[tuple[float, float, int], ...]:
    """The releases with one more at (q, z): its pair's count grown, or a new pair."""
    out = [list(r) for r in releases]
    for r in out:
        if r[0] == sampling_rate and r[1] == noise_multiplier:
            r[2] = int(r[2]) + 1
            break
    else:
        out.append([sampling_rate, noise_multiplier, 1])
    return tuple((float(q), float(z), int(n)) for q, z, n in sorted(out))


def over_budget(epsilon: float, budget: float, delta: float) -> str:
    """Why a release that would bring the spending to ``epsilon`` may not happen ('' : it may;
    a budget of 0 is none)."""
    if budget <= 0 or (math.isfinite(epsilon) and epsilon <= budget):
        return ""
    return (
        f"privacy budget: the next version would spend epsilon {epsilon:.3g} > "
        f"dp_epsilon_budget {budget:g} (delta {delta:.1e}); raise dp_epsilon_budget "
        "('sfl config set') and 'sfl resume' to go on"
    )


def describe(privacy: Mapping[str, Any], budget: float = 0.0) -> str:
    """One line for ``sfl status``: 'epsilon 2.31 of 3.0 at delta 5.0e-04 after 40 versions'."""
    of = f" of {budget:g}" if budget > 0 else ""
    versions = int(privacy.get("versions", 0))
    return (
        f"epsilon {float(privacy['epsilon']):.3g}{of} at delta {float(privacy['delta']):.1e} "
        f"after {versions} version{'s' if versions != 1 else ''}"
    )
