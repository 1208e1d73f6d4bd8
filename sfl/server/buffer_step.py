"""One buffer becomes the next model version: the staleness-weighted server step.

Each accepted update started from its own version. Its change from that version is rebased on
the buffer's base (the current model): ``current + scale * (update - its_base)``, where
``scale`` is the clip to the buffer's norm bound (``sfl.learning.rules.bounds``, as a
round's) times ``staleness_factor`` of how many versions behind it is
(``sfl.core.staleness``); its weight is its bounded example count. So, as in FedBuff, a stale
change moves the model less: its factor is not normalised away by the weighted mean (a buffer
of stale updates takes a shorter step), which is what keeps the step stable when small buffers
outpace the devices (benchmarks/buffered.py: with the factor in the weights alone, digits at
``buffer_size`` 3 of 10 training diverged). The configured rule (FedAvg, or a server optimiser
over the same weighted mean) then makes the version from the current model and the rebased
updates, summed in ticket order in float64, so a retry makes the bit-same model.

Called by ``sfl.server.buffered_steps`` for the one invocation that holds the buffer's lease;
writing the version once is ``sfl.server.aggregation.write_version``'s.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from sfl.core.config import FederationConfig
from sfl.core.staleness import staleness_factor
from sfl.learning.codec import decode
from sfl.learning.rules.aggregation import (
    CHUNK_ELEMENTS,
    AggregationError,
    Chunk,
    build_rule,
    cast_like,
)
from sfl.learning.rules.bounds import bounded_weights, clip_scale, keeps_base_value, model_norm
from sfl.learning.rules.bounds import norm_bound as bound_of
from sfl.server.aggregation import previous_state, write_version
from sfl.server.round_updates import Entry, RoundUpdates
from sfl.state.buffers import Buffer, Member

if TYPE_CHECKING:
    from sfl.server.context import AveragerContext
    from sfl.state.model_store import ModelStore


@dataclass(frozen=True)
class Step:
    """What a buffer's step wrote, for the buffer's close."""

    version: int
    summary: dict[str, Any]


def rebase(
    current: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    scale: float,
) -> dict[str, torch.Tensor]:
    """``current + scale * (update - base)`` per float tensor, in float64, returned in the
    current model's dtype; other tensors (counters) keep the current model's value."""
    out: dict[str, torch.Tensor] = {}
    for name, now in current.items():
        if keeps_base_value(now.dtype):
            out[name] = now.clone()
            continue
        change = update[name].to(torch.float64) - base[name].to(torch.float64)
        out[name] = cast_like(now.to(torch.float64) + scale * change, now.dtype)
    return out


class BufferUpdates:
    """A buffer's updates as rules read them (``UpdateSet``, streamed): each read with the
    ETag it was accepted with, decoded against its own base version, then rebased and
    clipped around the current model. One that cannot be read is left out (``excluded``)."""

    def __init__(
        self,
        s3: Any,
        bucket: str,
        models: ModelStore,
        current: Mapping[str, torch.Tensor],
        entries: Sequence[tuple[Entry, int]],
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.models = models
        self.current = current
        self.entries = list(entries)
        self.read: list[str] = []
        self.excluded: dict[str, str] = {}
        self._bases: dict[int, dict[str, torch.Tensor]] = {}

    def _base(self, version: int) -> dict[str, torch.Tensor]:
        """A base version's tensors; the last one kept (tickets' bases rise with their
        numbers, so a buffer read in ticket order decodes each version about once)."""
        if version not in self._bases:
            self._bases.clear()
            self._bases[version] = decode(self.models.model_bytes(version))
        return self._bases[version]

    def stream(
        self, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[Mapping[str, torch.Tensor], float]]:
        chosen = range(len(self.entries)) if indices is None else indices
        for i in chosen:
            entry, version = self.entries[i]
            base = self._base(version)
            with RoundUpdates(
                self.s3,
                self.bucket,
                [replace(entry, scale=1.0)],
                base,
                self.models.header(version),
                in_flight=1,
            ) as one:
                got = list(one.stream())
                if not got:
                    self.excluded[entry.client] = one.excluded.get(entry.client, "unreadable")
                    continue
            tensors = rebase(self.current, base, got[0][0], entry.scale)
            self.read.append(entry.client)
            yield tensors, entry.weight

    def chunks(self, max_elements: int = CHUNK_ELEMENTS) -> Iterator[Chunk]:
        raise AggregationError(
            "a rule that reads every update at once cannot step a buffer: buffered mode "
            "streams each buffer's rebased updates"
        )

    def weights(self) -> list[float]:
        return [entry.weight for entry, _ in self.entries]

    def clients(self) -> list[str]:
        return [entry.client for entry, _ in self.entries]


@dataclass(frozen=True)
class Weighing:
    """How much each of a buffer's updates counts in its step, and the norm bound."""

    weights: list[float]  # its example count, bounded
    clips: list[float]  # what of its change the norm bound keeps (1: all)
    scales: list[float]  # the clip times its staleness factor: what of its change is applied
    bound: float


def weigh(
    config: FederationConfig,
    examples: Sequence[int],
    norms: Sequence[float],
    staleness: Sequence[int],
    *,
    fallback: float,
    base_norm: float,
) -> Weighing:
    """A buffer's step in numbers, from each update's claimed examples, the norm of its
    change and how many versions behind it is: weights capped at ``max_weight_ratio`` times
    the median claim, changes clipped to the buffer's bound (``fallback``: the last bound, for
    a buffer of fewer than three), then shrunk by their staleness factors. Pure, so the
    benchmark steps as the averager does."""
    factors = [
        staleness_factor(
            config.staleness_weighting,
            tau,
            exponent=config.staleness_exponent,
            hinge=config.staleness_hinge,
        )
        for tau in staleness
    ]
    bound = bound_of(
        [n for n in norms if n > 0],
        factor=config.norm_bound_factor,
        absolute=config.max_update_norm,
        fallback=fallback,
        base_norm=base_norm,
    )
    clips = [clip_scale(n, bound) for n in norms]
    return Weighing(
        weights=bounded_weights(examples, config.max_weight_ratio),
        clips=clips,
        scales=[c * f for c, f in zip(clips, factors, strict=True)],
        bound=bound,
    )


def step(ctx: AveragerContext, buffer: Buffer, members: list[Member]) -> Step | None:
    """Write version ``buffer.version`` from the buffer's members; None if not one of them
    could be read back (the caller then writes the current model again, with the reason)."""
    started = ctx.clock()
    config = ctx.config
    rule = build_rule(config.aggregation, config.aggregation_params)
    current = decode(ctx.models.model_bytes(buffer.base_version))
    staleness = [buffer.base_version - m.base_version for m in members]
    weighing = weigh(
        config,
        [m.answer.num_examples for m in members],
        [m.answer.delta_norm for m in members],
        staleness,
        fallback=_previous_bound(ctx, buffer),
        base_norm=model_norm(current),
    )
    weights, bound = weighing.weights, weighing.bound
    entries = [
        (Entry(m.label, m.answer.key, m.answer.etag, w, scale), m.base_version)
        for m, w, scale in zip(members, weights, weighing.scales, strict=True)
    ]
    updates = BufferUpdates(ctx.s3, ctx.names.updates_bucket, ctx.models, current, entries)
    result = rule.aggregate(
        current, updates, previous_state(ctx, rule, config.aggregation, buffer.base_version)
    )
    if result is None:
        return None
    used = [m for m in members if m.label in updates.read]
    body, rewritten = write_version(
        ctx,
        rule,
        config.aggregation,
        current,
        result,
        buffer.version,
        buffer=buffer.number,
        participants=len(used),
    )
    by_label = {m.label: (w, t) for m, w, t in zip(members, weights, staleness, strict=True)}
    used_staleness = [by_label[m.label][1] for m in used]
    summary: dict[str, Any] = {
        "participants": len(used),
        "num_examples": sum(m.answer.num_examples for m in used),
        "weight": sum(by_label[m.label][0] for m in used),
        "client_loss": _weighted(used, by_label, "loss", 0.0, 1e6),
        "client_accuracy": _weighted(used, by_label, "accuracy", 0.0, 1.0),
        "aggregation": config.aggregation,
        "stateful_rule": rule.stateful,  # its state was read and written beside the version
        "staleness_weighting": config.staleness_weighting,
        "staleness": {str(t): used_staleness.count(t) for t in sorted(set(used_staleness))},
        "staleness_mean": statistics.fmean(used_staleness) if used_staleness else None,
        "aggregate_seconds": ctx.clock() - started,
        "model_bytes": len(body),
        "bytes_up": sum(m.answer.size for m in used),
        "norm_bound": bound if math.isfinite(bound) else None,
        "clipped": [m.label for m, c in zip(members, weighing.clips, strict=True) if c < 1.0],
        "excluded": dict(updates.excluded),
        "model_already_written": rewritten,
        **dict(result.details or {}),
    }
    return Step(buffer.version, summary)


def _previous_bound(ctx: AveragerContext, buffer: Buffer) -> float:
    """The norm bound the buffer before used: what a buffer of fewer than three updates
    clips to (as a round with too few updates uses the last round's)."""
    if buffer.number <= 1:
        return 0.0
    previous = ctx.buffers.buffer(buffer.experiment, buffer.number - 1)
    bound = previous.summary.get("norm_bound") if previous is not None else None
    return float(bound) if isinstance(bound, int | float) and bound > 0 else 0.0


def _weighted(
    used: list[Member],
    weights: Mapping[str, tuple[float, int]],
    metric: str,
    lo: float,
    hi: float,
) -> float | None:
    """A device-reported metric averaged with the step's weights, each value clamped."""
    pairs = [
        (weights[m.label][0], min(max(m.answer.metrics[metric], lo), hi))
        for m in used
        if metric in m.answer.metrics
    ]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total else None
