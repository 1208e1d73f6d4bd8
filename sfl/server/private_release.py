"""A round's user-level DP release (docs/privacy.md): the averager's side of DP-FedAvg.

With ``dp_noise_multiplier > 0`` every accepted update weighs 1 and its change from the base
model is clipped to the DP clip (replacing the median-based bound and the weight cap, which
depend on single devices' data); the clipped updates are summed (streamed, or by the shards),
``sfl.learning.rules.privacy.private_step`` adds the noise once and divides by the expected
number of devices the initiator recorded (q x N, never the count that answered), and the
rule receives that one release as ``PartialSums``. The step's ``PrivacyRecord`` is written
once beside the version before the model: a retry that finds it keeps its next clip and its
epsilon, and the model stays write-once. The releases so far come from the previous DP
version's record (across rollbacks, from the newest version before one). After the version,
if one more release at the same (q, z) would pass ``dp_epsilon_budget``, the experiment is
paused with the reason; a release that would pass it is refused before anything is written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sfl.core.config import FederationConfig
from sfl.core.privacy import PrivacySettings, default_delta
from sfl.core.privacy_ledger import PrivacyRecord, over_budget, with_release
from sfl.learning.accountant import Release, epsilon
from sfl.learning.rules.aggregation import (
    AggregationRule,
    FedAvg,
    UpdateSet,
)
from sfl.learning.rules.privacy import OneRelease, private_step, secret_generator
from sfl.state.rounds import Answer, Round

if TYPE_CHECKING:
    import torch

    from sfl.server.context import AveragerContext

logger = logging.getLogger(__name__)


def settings_of(config: FederationConfig) -> PrivacySettings:
    """The ``dp_*`` keys as the DP step takes them."""
    return PrivacySettings(
        noise_multiplier=config.dp_noise_multiplier,
        clip=config.dp_clip,
        clipping=config.dp_clipping,
        target_quantile=config.dp_target_quantile,
        clip_learning_rate=config.dp_clip_learning_rate,
        bits_stddev=config.dp_clip_bits_stddev,
    )


@dataclass(frozen=True)
class Sampling:
    """What the round's Poisson draw used, as the initiator recorded it."""

    rate: float
    population: int
    expected: float

    @classmethod
    def of(cls, round_: Round) -> Sampling | None:
        s = round_.sampling
        try:
            made = cls(float(s["rate"]), int(s["population"]), float(s["expected"]))
        except (KeyError, TypeError, ValueError):
            return None
        if not (0 < made.rate <= 1 and made.population >= 1 and made.expected > 0):
            return None
        return made


@dataclass(frozen=True)
class PrivatePlan:
    """What this round's DP step is decided to be before anything is read: its clip, the
    chain's releases before it, and a record a previous attempt wrote (then reused)."""

    config: FederationConfig
    settings: PrivacySettings
    sampling: Sampling
    version: int
    clip: float
    previous: PrivacyRecord | None
    written: PrivacyRecord | None  # a previous attempt's record for this version

    def release(
        self,
        ctx: AveragerContext,
        base: Mapping[str, torch.Tensor],
        updates: UpdateSet,
        accepted: Mapping[str, Answer],
    ) -> tuple[OneRelease, PrivacyRecord] | None:
        """Sum the clipped updates, noise the sum once, and write (or reuse) the record; None
        if not one update could be read (nothing released, nothing written)."""
        summed = FedAvg()
        summed.aggregate(base, updates, None)
        clipped = summed.partial()
        if not clipped.count:
            return None
        # The summed updates' norms, measured by the server at acceptance (the clip's bits).
        norms = [accepted[c].delta_norm for c in getattr(updates, "read", [])]
        step = private_step(
            clipped,
            base,
            norms,
            settings=self.settings,
            clip=self.clip,
            expected_devices=self.sampling.expected,
            generator=secret_generator(),
        )
        record = self.written
        if record is None:
            record = self._record(
                step.next_clip, step.noise.changes, step.noise.bits, step.noisy_bits, clipped.count
            )
            if not ctx.models.put_privacy(record):  # another attempt wrote it first: keep it
                record = ctx.models.privacy_record(self.version) or record
        return OneRelease(step.released), record

    def _record(
        self,
        next_clip: float,
        noise_changes: float,
        noise_bits: float,
        noisy_bits: float | None,
        summed: int,
    ) -> PrivacyRecord:
        q, z = self.sampling.rate, self.settings.noise_multiplier
        releases = with_release(self.previous.releases if self.previous else (), q, z)
        largest = max(
            self.sampling.population, self.previous.largest_population if self.previous else 0
        )
        delta = chain_delta(self.config, largest)
        spent = _epsilon(releases, delta)
        return PrivacyRecord(
            version=self.version,
            clip=self.clip,
            next_clip=next_clip,
            clipping=self.settings.clipping,
            noise_multiplier=z,
            noise_changes=noise_changes,
            noise_bits=noise_bits,
            noisy_bits=noisy_bits,
            sampling_rate=q,
            population=self.sampling.population,
            expected_devices=self.sampling.expected,
            summed=summed,
            releases=releases,
            largest_population=largest,
            delta=delta,
            epsilon=spent,
            next_epsilon=_epsilon(with_release(releases, q, z), delta),
            first_version=self.previous.first_version if self.previous else self.version,
        )


def chain_delta(config: FederationConfig, largest_population: int) -> float:
    """The delta epsilon is reported at: ``dp_delta``, else 1/N**1.1 for the largest
    population the chain sampled from (so it only shrinks, and epsilon only grows)."""
    return config.dp_delta if config.dp_delta > 0 else default_delta(largest_population)


def _epsilon(releases: Sequence[tuple[float, float, int]], delta: float) -> float:
    listed = [Release(q, z) for q, z, n in releases for _ in range(n)]
    return epsilon(listed, delta)


def plan(
    ctx: AveragerContext,
    round_: Round,
    config: FederationConfig,
    rule: AggregationRule,
    version: int,
) -> PrivatePlan | str:
    """This round's DP step, or why it may not be taken: the round is then abandoned and the
    experiment paused with that reason (nothing is released)."""
    refusal = _refusal(round_, config, rule)
    if refusal:
        ctx.control.pause(config.experiment, now=ctx.clock(), reason=refusal)
        return refusal
    sampling = Sampling.of(round_)
    assert sampling is not None  # _refusal checked it
    settings = settings_of(config)
    previous = previous_record(ctx, round_.base_version)
    written = ctx.models.privacy_record(version)
    if written is not None:
        clip = written.clip
    elif previous is not None and settings.clipping == "adaptive":
        clip = previous.next_clip
    else:
        clip = settings.clip
    made = PrivatePlan(config, settings, sampling, version, clip, previous, written)
    if written is None and config.dp_epsilon_budget > 0:  # a budget: is this release within?
        releases = with_release(
            previous.releases if previous else (), sampling.rate, settings.noise_multiplier
        )
        largest = max(sampling.population, previous.largest_population if previous else 0)
        delta = chain_delta(config, largest)
        refusal = over_budget(_epsilon(releases, delta), config.dp_epsilon_budget, delta)
        if refusal:
            ctx.control.pause(config.experiment, now=ctx.clock(), reason=refusal)
            return refusal
    return made


def _refusal(round_: Round, config: FederationConfig, rule: AggregationRule) -> str:
    if not rule.abilities.sums_in_shards:
        return (
            f"dp: aggregation {config.aggregation!r} does not sum in shards (its input is not "
            "the mean of the updates), so the Gaussian mechanism's sensitivity does not bound it"
        )
    sampling = Sampling.of(round_)
    if sampling is None:
        return "dp: the round has no Poisson sampling record (selection must be poisson)"
    try:
        settings_of(config).split(sampling.expected)
    except ValueError as e:  # the default bits' noise (expected / 20) for too few devices
        return f"dp: {e} (set dp_clip_bits_stddev, or sample more devices)"
    return ""


def previous_record(ctx: AveragerContext, base_version: int) -> PrivacyRecord | None:
    """The record of the chain's newest DP version: beside the base version, or, when the
    base is a rollback's copy, beside the newest version before it; None when the base was
    made without DP (the chain starts afresh: docs/privacy.md)."""
    version = base_version
    while version > 0:
        record = ctx.models.privacy_record(version)
        if record is not None:
            return record
        if "rolled_back_from" not in ctx.models.header(version).metadata:
            return None
        version -= 1
    return None


def after_version(ctx: AveragerContext, config: FederationConfig, record: PrivacyRecord) -> None:
    """Pause the experiment if one more release at this (q, z) would pass the budget."""
    reason = over_budget(record.next_epsilon, config.dp_epsilon_budget, record.delta)
    if reason:
        ctx.control.pause(config.experiment, now=ctx.clock(), reason=reason)
        logger.warning("privacy budget reached: experiment paused", extra={"reason": reason})
