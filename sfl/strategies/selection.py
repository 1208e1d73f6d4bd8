"""Client selection: who trains in the next round. Pure functions over candidates.

``fast_clients`` is the seed's rule: every active client may be picked, with a probability
that favours a low server-measured turnaround EWMA (weight 1/EWMA, at most ten times a
typical client's; clients with no history count as typical, so newcomers get a fair
chance). Never picks nobody when anyone is active.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sfl import plugins


@dataclass(frozen=True)
class Candidate:
    """An active client as selection sees it; every number is measured by the server."""

    client_id: str
    ewma_turnaround: float | None = None
    missed_streak: int = 0
    last_round: int = 0


# The most a client's speed can raise its selection weight over a typical client's.
MAX_SPEEDUP = 10.0

SelectionStrategy = Callable[[Sequence[Candidate], int, random.Random], list[str]]


def clients_to_pick(num_active: int, *, fraction: float, clients_per_round: int) -> int:
    """How many to pick: a fixed count if configured, else a fraction; at least one."""
    if num_active <= 0:
        return 0
    wanted = clients_per_round if clients_per_round > 0 else math.ceil(fraction * num_active)
    return max(1, min(num_active, wanted))


def cooled_down(candidates: Sequence[Candidate], round_number: int) -> list[Candidate]:
    """Clients that keep missing rounds sit some out: after ``s >= 2`` misses in a row, the
    next ``2 ** (s - 1)`` rounds (at most 32) after the last one. A device that heartbeats
    but never answers cannot stall every round; it is tried again, less and less often.
    Never empties the field: if everyone is cooling down, everyone stays."""
    ready = [
        c
        for c in candidates
        if c.missed_streak < 2 or round_number > c.last_round + 2 ** min(c.missed_streak - 1, 5)
    ]
    return ready or list(candidates)


def select_all(candidates: Sequence[Candidate], k: int, rng: random.Random) -> list[str]:
    return sorted(c.client_id for c in candidates)


def select_random(candidates: Sequence[Candidate], k: int, rng: random.Random) -> list[str]:
    return sorted(rng.sample([c.client_id for c in candidates], k))


def select_fast_clients(candidates: Sequence[Candidate], k: int, rng: random.Random) -> list[str]:
    """Weighted sampling without replacement, weight = 1 / turnaround EWMA.

    Turnarounds are floored at a tenth of the median known one, so no client weighs more
    than ten times a typical one; a client with no history counts as typical (median)."""
    known = sorted(
        c.ewma_turnaround for c in candidates if c.ewma_turnaround and c.ewma_turnaround > 0
    )
    typical = statistics.median_low(known) if known else 1.0
    floor = typical / MAX_SPEEDUP
    keyed = []
    for c in candidates:
        turnaround = c.ewma_turnaround if c.ewma_turnaround and c.ewma_turnaround > 0 else typical
        weight = 1.0 / max(turnaround, floor)
        # Efraimidis-Spirakis: the k largest u ** (1 / w) are a weighted sample.
        keyed.append((rng.random() ** (1.0 / weight), c.client_id))
    keyed.sort(reverse=True)
    return sorted(client for _, client in keyed[:k])


def get_selection_strategy(name: str) -> SelectionStrategy:
    result: SelectionStrategy = plugins.load("selection", name)
    return result
