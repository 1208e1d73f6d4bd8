"""Participant selection: utility x speed, an exploration share and a pick cap (issue 13).

Pure rules are exercised on hand-made candidates with seeded generators; what feeds them
(the accepted update's utility, recent picks) is asserted on the registry item the real
averager writes, and the initiator is shown to apply the configured policy.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from sfl.core.selection import (
    MAX_SPEEDUP,
    MAX_UTILITY_RATIO,
    Candidate,
    SelectionPolicy,
    SelectionStrategy,
    recent_share,
    select_by_utility,
    select_clients,
    select_fast_clients,
    under_pick_cap,
)
from sfl.server.initiator import start_round
from sfl.state.registry import (
    MAX_REPORTED_LOSS,
    ClientRecord,
    ClientRegistry,
    active_shard,
    statistical_utility,
)
from tests.conftest import TINY_MODEL, TRAINED, Stack
from tests.test_deadlines import _deliver, _setup

ROUND = 30
POLICY = SelectionPolicy(round_number=ROUND, exploration=0.2, max_share=0.8, window=10)


def _seen(
    client_id: str, turnaround: float, utility: float, last_round: int = ROUND - 1
) -> Candidate:
    """A client picked last round, so neither stale nor new."""
    return Candidate(
        client_id, turnaround, last_round=last_round, utility=utility, recent_picks=1.0
    )


def _pick_counts(
    rule: SelectionStrategy,
    candidates: Sequence[Candidate],
    k: int,
    policy: SelectionPolicy,
    rounds: int = 1000,
) -> Counter[str]:
    counts: Counter[str] = Counter()
    for seed in range(rounds):
        counts.update(rule(candidates, k, random.Random(seed), policy=policy))
    return counts


# --- the utility rule ------------------------------------------------------------------


def test_utility_prefers_clients_with_more_to_teach_and_quick_turnarounds() -> None:
    candidates = [
        _seen("useful-fast", 2.0, 300.0),
        _seen("useless-fast", 2.0, 30.0),
        _seen("useful-slow", 20.0, 300.0),
        *(_seen(f"typical-{i}", 2.0, 100.0) for i in range(5)),
    ]
    counts = _pick_counts(select_by_utility, candidates, 2, SelectionPolicy(round_number=ROUND))

    # drawn in proportion to score among those within 95% of the 2nd best score (typical)
    assert counts["useful-fast"] > 2 * counts["typical-0"] > 0
    assert counts["useless-fast"] == 0
    # ten times slower than the round's preferred turnaround: (1/10)^4 of its weight
    assert counts["useful-slow"] == 0


def test_a_slow_explored_client_lets_others_as_slow_come_along() -> None:
    """In an exploration round the round lasts as long as its slowest explored pick, so
    clients no slower than that are not penalised for speed in the same round."""
    stale_slow = Candidate("stale-slow", 20.0, last_round=ROUND - 11, utility=100.0)
    useful_slow = _seen("useful-slow", 15.0, 1000.0)
    fast = [_seen(f"fast-{i}", 2.0, 100.0) for i in range(6)]
    exploring = SelectionPolicy(round_number=ROUND + 1, exploration=0.05, window=10)
    quiet = SelectionPolicy(round_number=ROUND + 2, exploration=0.05, window=10)

    explored = select_by_utility([stale_slow, useful_slow, *fast], 3, random.Random(0), exploring)
    later = select_by_utility([stale_slow, useful_slow, *fast], 3, random.Random(0), quiet)

    assert {"stale-slow", "useful-slow"} <= set(explored)
    assert "useful-slow" not in later and "stale-slow" not in later


def test_a_device_claiming_a_huge_utility_gains_at_most_the_cap() -> None:
    liar = _seen("liar", 2.0, 1e12)
    capped = _seen("capped", 2.0, 100.0 * MAX_UTILITY_RATIO)
    others = [_seen(f"c{i}", 2.0, 100.0) for i in range(8)]
    counts = _pick_counts(select_by_utility, [liar, capped, *others], 1, SelectionPolicy(ROUND))

    assert counts["liar"] == pytest.approx(counts["capped"], rel=0.25)
    assert counts["liar"] < 700  # not every round: the others keep a share


def test_a_device_claiming_instant_turnaround_gains_nothing_over_the_speed_floor() -> None:
    typical = 10.0
    liar = _seen("liar", 1e-6, 100.0)
    floored = _seen("floored", typical / MAX_SPEEDUP, 100.0)
    others = [_seen(f"c{i}", typical, 100.0) for i in range(8)]
    counts = _pick_counts(select_by_utility, [liar, floored, *others], 2, SelectionPolicy(ROUND))

    assert counts["liar"] == pytest.approx(counts["floored"], rel=0.25)


def test_rules_are_deterministic_per_seed_and_never_pick_nobody() -> None:
    candidates = [_seen(f"c{i}", 1.0 + i, 10.0 * i) for i in range(12)]
    for rule in (select_by_utility, select_fast_clients):
        first = rule(candidates, 4, random.Random("7/default/30"), policy=POLICY)
        again = rule(candidates, 4, random.Random("7/default/30"), policy=POLICY)
        assert first == again and len(first) == 4 == len(set(first))
        assert len(rule(candidates, 0, random.Random(1), policy=POLICY)) == 1
        assert rule([], 3, random.Random(1), policy=POLICY) == []
        one_round = SelectionPolicy(round_number=11, exploration=0.5, max_share=0.05, window=1)
        assert len(rule(candidates, 4, random.Random(1), policy=one_round)) == 4
        # every candidate over the cap, nobody stale: the cap never empties the round
        hogs = [Candidate(f"h{i}", 1.0, last_round=ROUND - 1, recent_picks=9.0) for i in range(3)]
        assert len(rule(hogs, 2, random.Random(1), policy=POLICY)) == 2


# --- the exploration share and the pick cap --------------------------------------------


def test_exploration_takes_its_share_in_bursts_of_clients_not_picked_recently() -> None:
    """Every window-th round (1, 11, 21, 31, ...) takes exploration x window x k stale or
    new clients, so the slow ones that fill that pool slow one round per window."""
    recent = [_seen(f"fast-{i}", 1.0, 100.0) for i in range(10)]
    stale = [_seen(f"slow-{i}", 50.0, 100.0, last_round=ROUND - 11) for i in range(5)]
    new = [Candidate(f"new-{i}") for i in range(5)]
    field = [*recent, *stale, *new]

    def explored(number: int, seed: int) -> int:
        policy = SelectionPolicy(round_number=number, exploration=0.06, window=10)
        picks = select_fast_clients(field, 5, random.Random(seed), policy=policy)
        return sum(not p.startswith("fast") for p in picks)

    assert all(explored(ROUND + 1, seed) >= 3 for seed in range(200))  # 0.06 x 10 x 5 slots
    assert (
        sum(explored(ROUND + 2, seed) for seed in range(200))
        < sum(explored(ROUND + 1, seed) for seed in range(200)) / 2
    )


def test_the_pick_cap_benches_a_client_picked_in_most_recent_rounds_unless_needed() -> None:
    policy = SelectionPolicy(round_number=ROUND, max_share=0.5, window=10)
    # picked in each of the last 20 rounds: a decayed count near 10 * (1 - 0.9 ** 20)
    hog = Candidate("hog", 0.5, last_round=ROUND - 1, recent_picks=8.9, utility=1e3)
    rest = [_seen(f"c{i}", 5.0, 10.0) for i in range(4)]

    assert recent_share(hog, policy) > 0.8
    assert [c.client_id for c in under_pick_cap([hog, *rest], 4, policy)] == [
        c.client_id for c in rest
    ]
    assert "hog" not in _pick_counts(select_by_utility, [hog, *rest], 3, policy, rounds=100)
    # needed to fill the round: it plays
    assert "hog" in select_by_utility([hog, *rest], 5, random.Random(0), policy=policy)


def _run_rounds(
    rule: SelectionStrategy,
    policy_for: Callable[[int], SelectionPolicy],
    turnarounds: dict[str, float],
    k: int,
    rounds: int,
) -> list[list[str]]:
    """Rounds of selection over records the server's arithmetic keeps up to date."""
    records = {c: ClientRecord(c, last_seen=0.0, registered_at=0.0) for c in turnarounds}
    history = []
    for number in range(1, rounds + 1):
        candidates = [r.candidate() for r in records.values()]
        picks = rule(candidates, k, random.Random(f"0/default/{number}"), policy=policy_for(number))
        for c in picks:
            records[c] = records[c].after_round(
                number, answered=True, turnaround=turnarounds[c], b=0.8, utility=100.0
            )
        history.append(picks)
    return history


def test_fast_clients_can_no_longer_starve_slow_clients() -> None:
    turnarounds = {f"fast-{i}": 1.0 for i in range(6)} | {f"slow-{i}": 10.0 for i in range(6)}

    def seed_rule(number: int) -> SelectionPolicy:
        return SelectionPolicy(round_number=number)

    def with_floor(number: int) -> SelectionPolicy:
        return SelectionPolicy(round_number=number, exploration=0.2, max_share=0.8, window=10)

    def longest_wait(history: list[list[str]], client: str) -> int:
        rounds = [0, *(n for n, picks in enumerate(history, 1) if client in picks), len(history)]
        return max(b - a for a, b in itertools.pairwise(rounds))

    before = _run_rounds(select_fast_clients, seed_rule, turnarounds, 3, 100)
    after = _run_rounds(select_fast_clients, with_floor, turnarounds, 3, 100)
    slow = [c for c in turnarounds if c.startswith("slow")]

    assert max(longest_wait(after, c) for c in slow) <= 25
    assert max(longest_wait(before, c) for c in slow) > max(longest_wait(after, c) for c in slow)
    assert all(
        max(Counter(c for picks in after[i : i + 10] for c in picks).values()) <= 9
        for i in range(0, 100, 10)
    )


def test_fast_clients_without_a_policy_is_the_seeds_rule() -> None:
    """Weights 1 / EWMA (floored at a tenth of the median), Efraimidis-Spirakis keys drawn
    in candidate order: the same generator gives the same picks as before issue 13."""
    candidates = [Candidate(f"c{i}", float(1 + i % 5)) for i in range(9)] + [Candidate("new")]

    def seed_rule(cands: list[Candidate], k: int, rng: random.Random) -> list[str]:
        typical = sorted(c.ewma_turnaround for c in cands if c.ewma_turnaround)[4]
        keyed = sorted(
            (
                (rng.random() ** max(c.ewma_turnaround or typical, typical / 10), c.client_id)
                for c in cands
            ),
            reverse=True,
        )
        return sorted(cid for _, cid in keyed[:k])

    for seed in range(50):
        assert select_fast_clients(candidates, 3, random.Random(seed)) == seed_rule(
            candidates, 3, random.Random(seed)
        )


def test_a_custom_rule_with_the_three_argument_contract_still_works() -> None:
    def first_k(candidates: list[Candidate], k: int, rng: random.Random) -> list[str]:
        return [c.client_id for c in candidates[:k]]

    picked = select_clients(first_k, [Candidate("a"), Candidate("b")], 1, random.Random(0), POLICY)

    assert picked == ["a"]


# --- what feeds the rules: the server's record ------------------------------------------


def test_utility_is_the_bounded_loss_times_the_bounded_example_count() -> None:
    assert statistical_utility({"train_loss": 1.5, "loss": 9.0}, 40, 1000) == 60.0
    assert statistical_utility({"loss": 2.0}, 40, 1000) == 80.0
    assert statistical_utility({"train_loss": 1e30}, 40, 1000) == MAX_REPORTED_LOSS * 40
    assert statistical_utility({"train_loss": -5.0}, 40, 1000) == 0.0
    assert statistical_utility({"train_loss": 1.0}, 10**12, 1000) == 1000.0
    assert statistical_utility({"accuracy": 0.5}, 40, 1000) is None
    assert statistical_utility({"loss": float("nan")}, 40, 1000) is None


def test_recent_picks_decay_and_only_an_accepted_update_sets_utility() -> None:
    record = ClientRecord("c", last_seen=0.0, registered_at=0.0)
    record = record.after_round(1, answered=True, turnaround=5.0, b=0.8, utility=50.0)
    record = record.after_round(3, answered=False, turnaround=60.0, b=0.8, utility=999.0)

    assert record.recent_picks == pytest.approx(1.0 + 0.9**2)  # window 10: x0.9 per round
    assert record.utility == 50.0  # a miss keeps the last accepted update's utility
    assert (record.rounds_answered, record.rounds_missed, record.last_round) == (1, 1, 3)


def test_the_averager_records_a_bounded_utility_and_the_pick(stack: Stack) -> None:
    averager, clock, _ = _setup(stack, "honest", "liar", quorum="all_answered")
    clock.now += 3.0
    _deliver(
        averager,
        stack.upload_update("honest", 1, TRAINED, num_examples=50, metrics={"train_loss": 2.0}),
    )
    _deliver(
        averager,
        stack.upload_update(
            "liar", 1, TRAINED, num_examples=10**7, metrics={"train_loss": 1e9, "loss": 1.0}
        ),
    )

    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
    honest, liar = registry.get("honest"), registry.get("liar")
    assert honest is not None and liar is not None
    assert honest.utility == pytest.approx(100.0)
    assert honest.recent_picks == pytest.approx(1.0)
    assert liar.utility == MAX_REPORTED_LOSS * stack.config.max_num_examples


def test_server_written_selection_numbers_that_are_not_numbers_read_as_unknown(
    stack: Stack,
) -> None:
    now = time.time()
    for client_id, utility, picks in (
        ("strings", {"S": "huge"}, {"S": "none"}),
        ("neg", {"N": "-1"}, {"N": "1e100"}),
    ):
        stack.clients.dynamodb.put_item(
            TableName=stack.names.clients_table,
            Item={
                "client_id": {"S": client_id},
                "last_seen": {"N": str(now)},
                "active_shard": {"N": str(active_shard(client_id))},
                "utility": utility,
                "recent_picks": picks,
            },
        )

    active = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table).active(
        now=now, active_window_seconds=60
    )

    assert [(r.client_id, r.utility, r.recent_picks) for r in active] == [
        ("neg", None, 0.0),
        ("strings", None, 0.0),
    ]


def test_selection_reads_the_active_index_and_a_device_cannot_poison_it(stack: Stack) -> None:
    """Only items in a queried shard of the index are candidates: a device that writes an
    out-of-range shard hides itself, one without a shard is not indexed (operators still see
    both), one writing a string where the index wants a number is refused (by DynamoDB; by
    moto it is stored and never matches a shard)."""
    from botocore.exceptions import ClientError

    now = time.time()
    stack.register("a", "b", "c")
    ddb = stack.clients.dynamodb
    for client_id, shard in (("far", {"N": "999"}), ("negative", {"N": "-1"})):
        ddb.put_item(
            TableName=stack.names.clients_table,
            Item={
                "client_id": {"S": client_id},
                "last_seen": {"N": str(now)},
                "active_shard": shard,
            },
        )
    ddb.put_item(
        TableName=stack.names.clients_table,
        Item={"client_id": {"S": "unsharded"}, "last_seen": {"N": str(now)}},
    )
    try:  # real DynamoDB refuses an index key of the wrong type; moto stores the item
        ddb.put_item(
            TableName=stack.names.clients_table,
            Item={
                "client_id": {"S": "stringy"},
                "last_seen": {"N": str(now)},
                "active_shard": {"S": "everywhere"},
            },
        )
    except ClientError as e:
        refused = e.response["Error"]["Code"]
        assert refused == "ValidationException", refused
    registry = ClientRegistry(ddb, stack.names.clients_table)
    active = registry.active(now=now, active_window_seconds=60)
    assert [r.client_id for r in active] == ["a", "b", "c"]
    everyone = {r.client_id for r in registry.everyone(now=now, active_window_seconds=60)}
    assert everyone >= {"a", "b", "c", "far", "negative", "unsharded"}
    stack.put_model(0, TINY_MODEL)
    started = start_round(stack.clients, stack.names, stack.config)
    assert started.started and set(started.selected) <= {"a", "b", "c"}


def test_the_initiator_benches_last_rounds_picks_under_a_tight_pick_cap(stack: Stack) -> None:
    averager, clock, store = _setup(
        stack,
        "a",
        "b",
        "c",
        "d",
        selection="utility",
        clients_per_round=2,
        selection_max_share=0.05,
        selection_exploration=0.0,
        quorum="all_answered",
    )
    first = store.get("test", 1)
    assert first is not None and len(first.selected) == 2
    for client in first.selected:
        clock.now += 2.0
        _deliver(averager, stack.upload_update(client, 1, TRAINED))
    assert store.get("test", 1).status.finished  # type: ignore[union-attr]

    second = start_round(stack.clients, stack.names, stack.config, clock=clock)

    # one pick in the last ten rounds is over a 0.05 share: the other two play
    assert second.started and set(second.selected) == {"a", "b", "c", "d"} - set(first.selected)
