"""Robust aggregation rules: coordinate-wise median, trimmed mean, (Multi-)Krum, the
clamped mean.

They need every update's value of a coordinate at once, so they read updates as chunks
(the same rows of one tensor from every update): memory is ``CHUNK_ELEMENTS`` float64 values
plus the model, whatever the number of updates. They ignore claimed example counts, except
Multi-Krum and the clamped mean, which average with the bounded weights. The maths of the
first three follows Flower's ``aggregate_median``, ``aggregate_trimmed_avg`` and
``aggregate_krum``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from sfl.core.params import KrumParams, TrimmedMeanParams
from sfl.learning.rules.aggregation import (
    Abilities,
    Aggregate,
    FedAvg,
    Rule,
    State,
    UpdateSet,
    as_rows,
    cast_like,
)

# --- pure maths over one chunk (axis 0: updates) ---------------------------------------


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """Median along axis 0; with an even count, the mean of the two middle values."""
    ordered = values.sort(dim=0).values
    n = values.shape[0]
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def trimmed_mean(values: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Mean along axis 0 after cutting ``floor(trim_fraction * n)`` values from each tail."""
    n = values.shape[0]
    cut = int(trim_fraction * n)
    return values.sort(dim=0).values[cut : n - cut].mean(dim=0)


def add_squared_distances(distances: torch.Tensor, values: torch.Tensor) -> None:
    """Add this chunk's share of every pairwise squared L2 distance to ``distances``."""
    flat = values.reshape(values.shape[0], -1)
    gram = flat @ flat.T  # one matrix product: |a - b|^2 = |a|^2 + |b|^2 - 2 a.b
    squares = gram.diagonal()
    distances += (squares[:, None] + squares[None, :] - 2 * gram).clamp(min=0.0)


def krum_scores(distances: torch.Tensor, byzantine: int) -> list[float]:
    """Each update's Krum score: the sum of squared distances to its ``n - f - 2`` nearest
    other updates (at least one)."""
    n = distances.shape[0]
    nearest = max(1, n - byzantine - 2)
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(others.sort().values[:nearest].sum()))
    return scores


def add_gram(gram: torch.Tensor, changes: torch.Tensor) -> None:
    """Add this chunk's share of every pairwise dot product of the updates' changes."""
    flat = changes.reshape(changes.shape[0], -1)
    gram += flat @ flat.T


def clamp_against_others(
    gram: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """Coefficients ``c`` (and which changes were projected) such that ``sum_j c_j x_j`` is
    the weighted mean of the changes ``x`` after each change's component against the
    weighted sum of the others is removed.

    Computed from the changes' Gram matrix alone: each change is held as a combination of
    the originals (rows of ``a``). The change least aligned with the others (most negative
    cosine) is projected first, the others' sum then taken again with it projected, until
    none points against the others; each change is projected at most once. Every
    coefficient stays non-negative, so a projection only ever adds the others' direction.
    """
    n = len(weights)
    a = torch.eye(n, dtype=torch.float64)
    projected: set[int] = set()
    for _ in range(n):
        total = weights @ a
        worst, chosen = 0.0, None
        for i in range(n):
            if i in projected:
                continue
            others = total - weights[i] * a[i]
            others_sq = float(others @ gram @ others)
            own_sq = float(a[i] @ gram @ a[i])
            if not (others_sq > 0 and own_sq > 0):
                continue
            along = float(a[i] @ gram @ others)
            cosine = along / math.sqrt(others_sq * own_sq)
            if cosine < worst:
                worst, chosen = cosine, (i, others, along / others_sq)
        if chosen is None:
            break
        i, others, coefficient = chosen
        a[i] = a[i] - coefficient * others
        projected.add(i)
    return (weights @ a) / weights.sum(), sorted(projected)


# --- the rules ---------------------------------------------------------------------------


class _Coordinatewise(Rule):
    """A rule that reduces each coordinate's values across updates to one value."""

    abilities = Abilities(reads_all_at_once=True)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(
        self, base: Mapping[str, torch.Tensor], updates: UpdateSet, state: State | None
    ) -> Aggregate | None:
        return _by_chunks(base, updates, self.reduce)


def _by_chunks(
    base: Mapping[str, torch.Tensor],
    updates: UpdateSet,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> Aggregate | None:
    out = {name: torch.empty(t.shape, dtype=torch.float64) for name, t in base.items()}
    seen = False
    for chunk in updates.chunks():
        if chunk.values.shape[0] == 0:
            return None
        seen = True
        as_rows(out[chunk.name])[chunk.rows] = reduce(chunk.values)
    if not seen:
        return None
    return Aggregate(model={name: cast_like(v, base[name].dtype) for name, v in out.items()})


class Median(_Coordinatewise):
    """Coordinate-wise median (Yin et al. 2018)."""

    name = "median"

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return coordinate_median(values)


class TrimmedMean(_Coordinatewise):
    """Coordinate-wise trimmed mean (Yin et al. 2018)."""

    name = "trimmed_mean"
    Params = TrimmedMeanParams
    params: TrimmedMeanParams

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return trimmed_mean(values, self.params.trim_fraction)


class MultiKrum(Rule):
    """Multi-Krum (Blanchard et al. 2017): keep the updates closest to their neighbours and
    average those with their bounded weights; ``keep=1`` is Krum (the best one, as is).
    Reports the ids of the clients it kept and how many it assumed hostile."""

    name = "krum"
    Params = KrumParams
    params: KrumParams
    abilities = Abilities(reads_all_at_once=True)

    def aggregate(
        self, base: Mapping[str, torch.Tensor], updates: UpdateSet, state: State | None
    ) -> Aggregate | None:
        n = len(updates.weights())
        if n == 0:
            return None
        distances = torch.zeros((n, n), dtype=torch.float64)
        for chunk in updates.chunks():
            add_squared_distances(distances, chunk.values)
        byzantine = math.floor(self.params.byzantine_fraction * n)
        keep = self.params.keep or n - byzantine
        keep = max(1, min(keep, n))
        scores = krum_scores(distances, byzantine)
        chosen = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:keep])
        clients = updates.clients()
        details = {"krum_kept": [clients[i] for i in chosen], "krum_byzantine": byzantine}
        if keep == 1:
            ((tensors, _),) = list(updates.stream(chosen))
            model = {name: t.clone().contiguous() for name, t in tensors.items()}
            return Aggregate(model=model, details=details)
        kept = FedAvg()
        for tensors, weight in updates.stream(chosen):
            kept.add(tensors, weight)
        result = kept.result()
        return None if result is None else Aggregate(model=result, details=details)


class ClampedMean(Rule):
    """The weighted mean after each update's component against the others' is removed
    (``clamp_against_others``): one device can hold a round back, not turn it around along
    what the others agree on. Reports the clients whose change was projected."""

    name = "clamped_mean"
    abilities = Abilities(reads_all_at_once=True)

    def aggregate(
        self, base: Mapping[str, torch.Tensor], updates: UpdateSet, state: State | None
    ) -> Aggregate | None:
        weights = torch.tensor(updates.weights(), dtype=torch.float64)
        n = len(weights)
        if n == 0:
            return None
        gram = torch.zeros((n, n), dtype=torch.float64)
        for chunk in updates.chunks():
            start = as_rows(base[chunk.name])[chunk.rows].to(torch.float64)
            add_gram(gram, chunk.values - start)
        share, projected = clamp_against_others(gram, weights)
        sums = {name: t.to(torch.float64).clone() for name, t in base.items()}
        for (tensors, _), c in zip(updates.stream(), share.tolist(), strict=True):
            for name, t in tensors.items():
                sums[name].add_(t.to(torch.float64) - base[name].to(torch.float64), alpha=c)
        clients = updates.clients()
        model = {name: cast_like(v, base[name].dtype) for name, v in sums.items()}
        return Aggregate(model=model, details={"clamped": [clients[i] for i in projected]})
