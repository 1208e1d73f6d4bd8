"""The bounds every aggregation rule runs under: how much one client can weigh and move.

A device claims its example count and chooses its update; neither may decide the model.
``bounded_weights`` caps each claim at a multiple of the round's median claim, and
``norm_bound`` / ``clip_to_bound`` shrink an update whose change from the base model is far
larger than the round's typical change (or than a configured absolute bound). Tensors that
are not floating point (counters such as BatchNorm's ``num_batches_tracked``) cannot be
clipped or averaged meaningfully, so an update's are replaced by the base model's
(``keeps_base_value``): no device moves them, under any rule. Pure functions over numbers
and tensors; the averager applies them while it streams.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch


def bounded_weights(examples: Sequence[int], max_ratio: float) -> list[float]:
    """Each client's weight: its example count, at most ``max_ratio`` times the round's
    (lower) median count, so no single claim outweighs the rest beyond that ratio."""
    if not examples:
        return []
    cap = max_ratio * statistics.median_low(examples)
    return [float(min(n, cap)) for n in examples]


# Fewer changes than this are too few for a median to say what is typical.
MIN_NORMS_FOR_MEDIAN = 3
# With no other reference, a lone update may change the model by at most this many times the
# base model's own norm.
LONE_CHANGE_PER_BASE_NORM = 4.0


def norm_bound(
    norms: Sequence[float],
    *,
    factor: float,
    absolute: float,
    fallback: float = 0.0,
    base_norm: float = 0.0,
) -> float:
    """The largest change one update may make: ``factor`` times the round's (lower) median
    change, and at most ``absolute``; 0 turns either bound off (``inf``: no bound).

    With fewer than three changes a median would be the devices' own, so the ``fallback``
    (the last round's bound) stands in; without one, two changes are bounded by ``factor``
    times the smaller, and a lone change by ``LONE_CHANGE_PER_BASE_NORM`` times
    ``base_norm``."""
    bound = math.inf
    if factor > 0 and norms:
        if len(norms) >= MIN_NORMS_FOR_MEDIAN:
            bound = factor * statistics.median_low(norms)
        elif fallback > 0:
            bound = fallback
        elif len(norms) == 2:
            bound = factor * min(norms)
        elif base_norm > 0:
            bound = LONE_CHANGE_PER_BASE_NORM * base_norm
    if absolute > 0:
        bound = min(bound, absolute)
    return bound


def model_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm, in float64, of a model's floating-point tensors."""
    floats = [t for t in tensors.values() if t.dtype.is_floating_point]
    return math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in floats))


def keeps_base_value(dtype: torch.dtype) -> bool:
    """Whether an update's tensor of this dtype is replaced by the base model's: integer and
    boolean tensors are counters or masks, which no bound on a change can make safe (one
    device's 2**62 would average to 2**60 and more)."""
    return not dtype.is_floating_point


def clip_scale(norm: float, bound: float) -> float:
    """How much of an update's change to keep: 1, or ``bound / norm`` if it is over."""
    if not norm > bound:
        return 1.0
    return bound / norm


def bounded_round(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], int]],
    base: Mapping[str, torch.Tensor],
    *,
    max_ratio: float,
    factor: float,
    absolute: float = 0.0,
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """A round's updates held in memory, (tensors, claimed examples) each, within the round's
    bounds as the averager bounds them while it streams: (bounded tensors, weight) each. For
    references, benchmarks and tests."""
    weights = bounded_weights([n for _, n in updates], max_ratio)
    norms = [
        model_norm(
            {k: t.to(torch.float64) - base[k] for k, t in u.items() if t.dtype.is_floating_point}
        )
        for u, _ in updates
    ]
    bound = norm_bound(
        [x for x in norms if x > 0], factor=factor, absolute=absolute, base_norm=model_norm(base)
    )
    return [
        (clip_to_bound(u, base, clip_scale(norm, bound)), w)
        for (u, _), norm, w in zip(updates, norms, weights, strict=True)
    ]


def clip_to_bound(
    update: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """``base + scale * (update - base)`` for float tensors (computed in float64, returned in
    the update's dtype, which the aggregate keeps); other tensors are the base model's."""
    out: dict[str, torch.Tensor] = {}
    for name, t in update.items():
        if keeps_base_value(t.dtype):
            out[name] = base[name].clone()
        elif scale >= 1.0:
            out[name] = t
        else:
            start = base[name].to(torch.float64)
            out[name] = (start + scale * (t.to(torch.float64) - start)).to(t.dtype)
    return out
