"""Client selection: who trains in the next round. Pure functions over candidates.

Every number a rule sees is measured or bounded by the server (``sfl.state.registry``): turnaround
EWMA, its recent misses, the round it was last picked in, how often it was picked lately, and
the utility of its last accepted update. Rules are deterministic for a given ``rng`` (the
initiator seeds one per round), never pick nobody when anyone is active, and cost a few
passes over the candidates plus one sort (medians).

- ``random``: a uniform sample, the baseline.
- ``fast_clients``: a sample weighted by 1 / turnaround (fast devices more often).
- ``utility``: Oort-like (Lai et al., OSDI '21): statistical utility (loss x examples of the
  last accepted update) times a penalty for being slower than the round's preferred
  turnaround. Both ``fast_clients`` and ``utility`` keep an exploration share for clients not
  picked recently and a cap on how often one client is picked (``SelectionPolicy``).
- ``all``: everyone.
- ``poisson``: every candidate independently with probability q (``sampling_rate``), so a
  round's size varies and may be nobody; the one rule differential privacy's accountant
  covers (docs/privacy.md). With DP on the initiator draws from the operating system's
  randomness, never from the seeded ``rng``.

See docs/selection.md for the rules, their parameters and the measurements.
"""

from __future__ import annotations

import heapq
import inspect
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sfl.core import plugins
from sfl.core.liveness import DEFAULT_WINDOW, bench_rounds, history_from_streak, valid_history

if TYPE_CHECKING:
    from sfl.core.config import FederationConfig


@dataclass(frozen=True)
class Candidate:
    """An active client as selection sees it; every number is measured by the server."""

    client_id: str
    ewma_turnaround: float | None = None
    missed_streak: int = 0
    last_round: int = 0  # the last round it was picked in and counted; 0: never
    utility: float | None = None  # bounded loss x examples of its last accepted update
    recent_picks: float = 0.0  # decayed count of rounds picked in, as of last_round
    # Its last picks' outcomes (sfl.core.liveness); None: a record from before histories,
    # judged by its streak of misses.
    miss_history: int | None = None

    @property
    def history(self) -> int:
        if self.miss_history is None:
            return history_from_streak(self.missed_streak)
        return valid_history(self.miss_history)


@dataclass(frozen=True)
class SelectionPolicy:
    """What the federation's config says about exploration and fairness, for this round.

    The defaults turn both off, so a rule called without a policy behaves as it always did."""

    round_number: int = 0
    exploration: float = 0.0  # share of picks reserved for clients not picked recently
    max_share: float = 1.0  # a client picked in more than this share of recent rounds sits out
    window: int = 10  # rounds over which recent picks are counted and staleness judged
    speed_exponent: float = 4.0  # 'utility': penalty exponent for slower-than-preferred clients
    sampling_rate: float = 0.0  # 'poisson': each candidate's probability; 0: k / candidates

    @classmethod
    def from_config(cls, config: FederationConfig, round_number: int) -> SelectionPolicy:
        return cls(
            round_number=round_number,
            exploration=config.selection_exploration,
            max_share=config.selection_max_share,
            window=config.selection_window,
            speed_exponent=config.selection_speed_exponent,
        )


# The most a client's speed can raise its selection weight over a typical client's.
MAX_SPEEDUP = 10.0
# The most (and least) a client's utility can weigh against a typical client's: a device
# reporting a huge loss or example count gains at most this factor.
MAX_UTILITY_RATIO = 10.0
# 'utility' draws only among clients scoring at least this share of the k-th best score.
EXPLOIT_CUTOFF = 0.95

# A rule is called as rule(candidates, k, rng), and with policy=... if it takes a 'policy'.
SelectionStrategy = Callable[..., list[str]]


def clients_to_pick(num_active: int, *, fraction: float, clients_per_round: int) -> int:
    """How many to pick: a fixed count if configured, else a fraction; at least one."""
    if num_active <= 0:
        return 0
    wanted = clients_per_round if clients_per_round > 0 else math.ceil(fraction * num_active)
    return max(1, min(num_active, wanted))


def sampling_rate(num_candidates: int, *, fraction: float, clients_per_round: int) -> float:
    """``poisson``'s q: ``clients_per_round`` over the candidates (at most 1), else
    ``fraction``; the expected round size is ``q x num_candidates``."""
    if num_candidates <= 0:
        return 0.0
    if clients_per_round > 0:
        return min(1.0, clients_per_round / num_candidates)
    return min(1.0, fraction)


def cooled_down(
    candidates: Sequence[Candidate], round_number: int, window: int = DEFAULT_WINDOW
) -> list[Candidate]:
    """Clients that keep missing rounds sit some out: with ``m >= 2`` misses among their last
    ``window`` picks, the next ``2 ** (m - 1)`` rounds (at most 32) after their last pick
    (``sfl.core.liveness.bench_rounds``). Misses are counted over the window, not in a row,
    so neither a silent device nor one alternating answers and silence stalls every round;
    it is tried again, less and less often. Never empties the field: if everyone is cooling
    down, everyone stays."""
    ready = [c for c in candidates if round_number > c.last_round + bench_rounds(c.history, window)]
    return ready or list(candidates)


def decayed_picks(previous: float, last_round: int, round_number: int, window: int) -> float:
    """A pick count that forgets: each round multiplies it by ``1 - 1 / window``, so a client
    picked every round tends to ``window`` and one picked in a share ``p`` of rounds to
    ``p x window``. ``previous`` was counted as of ``last_round``."""
    if previous <= 0 or last_round <= 0:
        return 0.0
    keep = 1.0 - 1.0 / max(window, 1)
    return previous * keep ** max(round_number - last_round, 0)


def recent_share(candidate: Candidate, policy: SelectionPolicy) -> float:
    """About what share of the recent rounds this client was picked in: its decayed pick
    count over what being picked in every round would give. Until ``window`` rounds have
    passed it is judged as if they had (the cap bites on a habit, not on one early pick)."""
    window = max(policy.window, 1)
    keep = 1.0 - 1.0 / window
    rounds = max(policy.round_number - 1, window)
    most = keep * (1.0 - keep**rounds) / (1.0 - keep)  # sum of keep ** i, i = 1 .. rounds
    if most <= 0:  # a window of one round remembers nothing past it
        return 0.0
    load = decayed_picks(candidate.recent_picks, candidate.last_round, policy.round_number, window)
    return min(load / most, 1.0)


def under_pick_cap(
    candidates: Sequence[Candidate], k: int, policy: SelectionPolicy
) -> list[Candidate]:
    """The candidates whose recent share is within ``policy.max_share``; if fewer than ``k``
    are, the least-picked of the others fill up to ``k`` (the cap never shrinks a round)."""
    if policy.max_share >= 1.0:
        return list(candidates)
    shares = {c.client_id: recent_share(c, policy) for c in candidates}
    allowed = {cid for cid, share in shares.items() if share <= policy.max_share}
    if len(allowed) < k:
        over = [
            (shares[c.client_id], c.client_id) for c in candidates if c.client_id not in allowed
        ]
        allowed.update(cid for _, cid in heapq.nsmallest(k - len(allowed), over))
    return [c for c in candidates if c.client_id in allowed]


def is_stale(candidate: Candidate, policy: SelectionPolicy) -> bool:
    """Never picked, or not in the last ``window`` rounds: what exploration is for."""
    return candidate.last_round <= 0 or (policy.round_number - candidate.last_round > policy.window)


def exploration_picks(
    candidates: Sequence[Candidate], k: int, rng: random.Random, policy: SelectionPolicy
) -> list[str]:
    """Stale clients, longest-unpicked first, in bursts: every ``window``-th round (1,
    1 + window, ...) takes up to ``exploration x window x k`` of them (at most ``k``), other
    rounds none. At most ``exploration`` of all picks go to exploration, and the slow
    clients that usually fill the stale pool slow one round per window instead of every
    round. A fractional slot is taken with that probability. No draw from ``rng`` outside
    exploration rounds or with exploration off: rules without it keep their seed semantics."""
    if policy.exploration <= 0 or k <= 0 or (policy.round_number - 1) % max(policy.window, 1):
        return []
    slots = min(policy.exploration * max(policy.window, 1) * k, float(k))
    whole = int(slots)
    wanted = whole + (1 if rng.random() < slots - whole else 0)
    # The longest-unpicked first (never picked: first of all), ties in random order, so
    # every stale client's wait is bounded by the pool's size over the burst's slots.
    pool = [(c.last_round, rng.random(), c.client_id) for c in candidates if is_stale(c, policy)]
    return [client for *_, client in heapq.nsmallest(wanted, pool)]


Exploit = Callable[
    [Sequence[Candidate], Sequence[Candidate], int, random.Random, SelectionPolicy], list[str]
]


def _explore_then_exploit(
    candidates: Sequence[Candidate],
    k: int,
    rng: random.Random,
    policy: SelectionPolicy,
    exploit: Exploit,
) -> list[str]:
    """The frame both adaptive rules share: pick cap, exploration share, then the rule's own
    weighted picks from the rest. Never empty while anyone is a candidate."""
    if not candidates:
        return []
    k = max(1, min(k, len(candidates)))
    field_ = under_pick_cap(candidates, k, policy)
    explored = exploration_picks(field_, k, rng, policy)
    taken = set(explored)
    rest = [c for c in field_ if c.client_id not in taken]
    chosen = explored + (exploit(field_, rest, k - len(explored), rng, policy) if rest else [])
    return sorted(chosen)


def _typical(values: Sequence[float | None], default: float) -> float:
    known = [v for v in values if v is not None and v > 0]
    return statistics.median_low(known) if known else default


def select_all(candidates: Sequence[Candidate], k: int, rng: random.Random) -> list[str]:
    return sorted(c.client_id for c in candidates)


def select_random(candidates: Sequence[Candidate], k: int, rng: random.Random) -> list[str]:
    return sorted(rng.sample([c.client_id for c in candidates], k))


def select_poisson(
    candidates: Sequence[Candidate],
    k: int,
    rng: random.Random,
    policy: SelectionPolicy | None = None,
) -> list[str]:
    """Each candidate independently with probability q (``policy.sampling_rate``, else
    ``k / len(candidates)``): Poisson sampling, whose privacy amplification the accountant
    counts. The round's size varies; it may be nobody (the initiator then starts no round)."""
    if not candidates:
        return []
    q = policy.sampling_rate if policy is not None and policy.sampling_rate > 0 else 0.0
    q = min(1.0, q or k / len(candidates))
    return sorted(c.client_id for c in candidates if rng.random() < q)


def select_fast_clients(
    candidates: Sequence[Candidate],
    k: int,
    rng: random.Random,
    policy: SelectionPolicy | None = None,
) -> list[str]:
    """Weighted sampling without replacement, weight = 1 / turnaround EWMA, after the pick
    cap and the exploration share (``policy``; without one, neither applies).

    Turnarounds are floored at a tenth of the median known one, so no client weighs more
    than ten times a typical one; a client with no history counts as typical (median)."""
    return _explore_then_exploit(candidates, k, rng, policy or SelectionPolicy(), _fastest)


def _fastest(
    field_: Sequence[Candidate],
    rest: Sequence[Candidate],
    k: int,
    rng: random.Random,
    policy: SelectionPolicy,
) -> list[str]:
    typical = _typical([c.ewma_turnaround for c in field_], 1.0)
    floor = typical / MAX_SPEEDUP
    keyed = []
    for c in rest:
        turnaround = c.ewma_turnaround if c.ewma_turnaround and c.ewma_turnaround > 0 else typical
        weight = 1.0 / max(turnaround, floor)
        # Efraimidis-Spirakis: the k largest u ** (1 / w) are a weighted sample.
        keyed.append((rng.random() ** (1.0 / weight), c.client_id))
    return [client for _, client in heapq.nlargest(k, keyed)]


def select_by_utility(
    candidates: Sequence[Candidate],
    k: int,
    rng: random.Random,
    policy: SelectionPolicy | None = None,
) -> list[str]:
    """Oort-like: score = statistical utility x speed penalty, after the pick cap and the
    exploration share; drawn among the clients within ``EXPLOIT_CUTOFF`` of the k-th best
    score, in proportion to it.

    Utility is the server-bounded loss x examples of a client's last accepted update, aged
    by ``1 - 1 / window`` per round since (older losses were measured on a worse model),
    then kept within ``MAX_UTILITY_RATIO`` of the median (unknown: the median). The round's
    preferred turnaround is the ``k``-th smallest (what picking the ``k`` fastest would
    cost), or the slowest explored pick's if that is longer; a client slower than that
    scores ``(preferred / its own) ** speed_exponent`` of its utility. Unknown turnaround:
    the median; claimed speed beyond ``MAX_SPEEDUP`` x typical buys nothing."""
    return _explore_then_exploit(candidates, k, rng, policy or SelectionPolicy(), _most_useful)


def _most_useful(
    field_: Sequence[Candidate],
    rest: Sequence[Candidate],
    k: int,
    rng: random.Random,
    policy: SelectionPolicy,
) -> list[str]:
    typical_t = _typical([c.ewma_turnaround for c in field_], 1.0)
    floor_t = typical_t / MAX_SPEEDUP

    def turnaround(c: Candidate) -> float:
        known = c.ewma_turnaround if c.ewma_turnaround and c.ewma_turnaround > 0 else typical_t
        return max(known, floor_t)

    # The round's preferred turnaround: what picking the k fastest would cost, or what the
    # slowest explored client costs anyway (then others as slow come along for free).
    open_ = {c.client_id for c in rest}  # the field minus this round's explored picks
    slots = max(1, min(len(field_), k + len(field_) - len(rest)))
    preferred = max(
        heapq.nsmallest(slots, (turnaround(c) for c in field_))[-1],
        max((turnaround(c) for c in field_ if c.client_id not in open_), default=0.0),
    )
    keep = 1.0 - 1.0 / max(policy.window, 1)

    def aged(c: Candidate) -> float | None:
        # Measured on the model of its round: losses fall as training goes on, so an old
        # utility overstates what the client has to teach now.
        if c.utility is None:
            return None
        return c.utility * keep ** max(policy.round_number - c.last_round - 1, 0)

    typical_u = _typical([aged(c) for c in field_], 1.0)
    scores = []
    for c in rest:
        utility = aged(c)
        utility = utility if utility is not None else typical_u
        utility = min(max(utility, typical_u / MAX_UTILITY_RATIO), typical_u * MAX_UTILITY_RATIO)
        speed = min(1.0, preferred / turnaround(c)) ** policy.speed_exponent
        scores.append((max(utility / typical_u * speed, 1e-12), c.client_id))
    # Oort's exploitation: only clients scoring within EXPLOIT_CUTOFF of the k-th best are
    # in the draw, sampled in proportion to their score (Efraimidis-Spirakis in log space).
    bar = EXPLOIT_CUTOFF * heapq.nlargest(k, scores)[-1][0] if k > 0 else math.inf
    keyed = [
        (math.log(1.0 - rng.random()) / score, client) for score, client in scores if score >= bar
    ]
    return [client for _, client in heapq.nlargest(k, keyed)]


def get_selection_strategy(name: str) -> SelectionStrategy:
    result: SelectionStrategy = plugins.load("selection", name)
    return result


def select_clients(
    strategy: SelectionStrategy,
    candidates: Sequence[Candidate],
    k: int,
    rng: random.Random,
    policy: SelectionPolicy,
) -> list[str]:
    """Call a rule; the policy goes to rules that take one (custom rules written for the
    three-argument contract keep working)."""
    if _takes_policy(strategy):
        return list(strategy(candidates, k, rng, policy=policy))
    return list(strategy(candidates, k, rng))


def _takes_policy(strategy: Any) -> bool:
    try:
        return "policy" in inspect.signature(strategy).parameters
    except (TypeError, ValueError):
        return False
