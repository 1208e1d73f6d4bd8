"""Selection measures useful work: answering every pick at once with the base model plus a
trace earns no place in later rounds (issue 20).

The replay is the benchmark's (``benchmarks/selection_gaming.py``): the production selection
rules, ``cooled_down`` and ``ClientRecord.after_round`` over 500 rounds of 20 clients, with the
averager's crediting (``sfl.core.credit``). Before, the gamer was in 28-84% of the rounds."""

from __future__ import annotations

import pytest

from benchmarks.selection_gaming import CLIENTS, replay
from sfl.core.credit import grown_pool, is_negligible, typical_change
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import RoundState
from tests.conftest import Stack
from tests.test_deadlines import _deliver, _setup
from tests.test_hostile_devices import _moved


@pytest.mark.parametrize("rule", ["fast_clients", "utility"])
@pytest.mark.parametrize("k", [1, 5])
def test_a_device_answering_at_once_with_nothing_is_picked_at_most_twice_its_fair_share(
    rule: str, k: int
) -> None:
    fair = k / CLIENTS

    share = replay(rule, k, rounds=500, seed=0)["share"]

    assert share <= 2 * fair


def test_the_old_crediting_let_it_into_most_rounds() -> None:
    """The same replay crediting every accepted answer: the attack the bound is about."""
    assert replay("utility", 1, rounds=500, seed=0, credit="at_answer")["share"] > 5 * (1 / CLIENTS)
    assert replay("fast_clients", 5, rounds=500, seed=0, credit="at_answer")["share"] > 2 * (
        5 / CLIENTS
    )


def test_a_lone_answer_is_judged_against_recent_rounds_not_itself() -> None:
    pool = grown_pool((), [1.0, 0.9, 1.2])

    typical = typical_change(pool, [1e-4])  # a round of one: the trace alone

    assert typical == pytest.approx(0.9)
    assert is_negligible(1e-4, typical)
    assert not is_negligible(0.5, typical)  # an honest small change still counts
    assert grown_pool(pool, []) == pool  # negligible changes never join the reference
    assert typical_change((), [1e-4]) == 0.0  # nothing to judge against: credited


def test_an_accepted_trace_of_a_change_earns_no_credit_when_its_round_finishes(
    stack: Stack,
) -> None:
    """Through the handlers: the trace is accepted (it is a valid update), but when the round
    closes the registry counts it as a miss: no fast turnaround, no utility."""
    averager, clock, store = _setup(stack, "a", "b", "c", "gamer", quorum="all_answered")
    gamer = stack.upload_update(
        "gamer", 1, _moved(1e-4), num_examples=10_000, metrics={"loss": 20.0, "accuracy": 0.0}
    )
    assert _deliver(averager, gamer) == "accepted"  # at once
    clock.now += 30.0
    for client, by in (("a", 1.0), ("b", 0.9), ("c", 1.1)):
        assert _deliver(averager, stack.upload_update(client, 1, _moved(by))) == "accepted"

    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
    gamer_record, honest = registry.get("gamer"), registry.get("a")
    assert gamer_record is not None and honest is not None
    assert (gamer_record.rounds_answered, gamer_record.rounds_missed) == (0, 1)
    assert gamer_record.utility is None
    assert gamer_record.ewma_turnaround == pytest.approx(120.0)  # the whole round, as a miss
    assert (honest.rounds_answered, honest.rounds_missed) == (1, 0)
    assert honest.ewma_turnaround == pytest.approx(30.0, abs=0.01)
