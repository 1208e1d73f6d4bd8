"""Liveness cannot be gamed (issue 20): misses are counted over a device's recent picks, not
in a row, so a device that answers one pick and stays silent the next is benched; and past
the soft deadline a round stops waiting for devices whose recent picks say they will not
answer, while an honest slow device is still waited for.

End to end through the real handlers: the initiator (``start_round``) picks, the averager
judges uploads and ticks, the registry is counted when each round finishes."""

from __future__ import annotations

from sfl.core.liveness import (
    EMPTY_HISTORY,
    bench_rounds,
    history_from_streak,
    is_doubtful,
    record_pick,
)
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import Stack
from tests.test_deadlines import Clock, _deliver, _setup
from tests.test_hostile_devices import DELTA, _model


def _heartbeat(stack: Stack, clock: Clock, *clients: str) -> None:
    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
    for client in clients:
        registry.heartbeat(client, now=clock.now, active_window_seconds=1_800)


def _answer(stack: Stack, averager: Averager, store: RoundStore, client: str, number: int) -> None:
    """Train, as far as the round can tell: the round's base model moved along DELTA."""
    round_ = store.get("test", number, slots=False)
    assert round_ is not None
    base = _model(stack, round_.base_version)
    scale = 0.5 + 0.01 * sum(map(ord, client)) % 7
    update = {name: base[name] + scale * DELTA[name] for name in base}
    _deliver(
        averager, stack.upload_update(client, number, update, base_version=round_.base_version)
    )


def _finish(averager: Averager, clock: Clock, store: RoundStore, number: int) -> tuple[str, str]:
    """Tick the round on until it is finished: (its status, the deadline it waited for)."""
    waited = "none"
    for step, label in ((61.0, "soft"), (60.0, "hard")):
        round_ = store.get("test", number, slots=False)
        assert round_ is not None
        if round_.status.finished:
            break
        clock.now += step
        waited = label
        averager.tick()
    round_ = store.get("test", number, slots=False)
    assert round_ is not None and round_.status.finished
    return str(round_.status), waited


def test_a_device_alternating_answers_and_silence_is_benched_and_rounds_stop_waiting(
    stack: Stack,
) -> None:
    averager, clock, store = _setup(stack, "a", "b", "flaky", quorum="all_answered")
    flaky_picks = 0
    rounds: dict[int, tuple[bool, str, str]] = {}  # number: (flaky picked, status, waited)
    for number in range(1, 11):
        if number > 1:
            clock.now += 1.0
            _heartbeat(stack, clock, "a", "b", "flaky")
            started = start_round(stack.clients, stack.names, stack.config, clock=clock)
            assert started.started
            selected = started.selected
        else:
            selected = ("a", "b", "flaky")
        for client in selected:
            if client == "flaky":
                flaky_picks += 1
                if flaky_picks % 2 == 0:
                    continue  # silent every other time it is picked
            _answer(stack, averager, store, client, number)
        rounds[number] = ("flaky" in selected, *_finish(averager, clock, store, number))

    # Picked 1-4 (two misses, one apart), then it sits rounds out: 5-6 after its second
    # miss, 8-9 after the answer that followed (an answer does not clear the window).
    assert [n for n, (picked, *_) in rounds.items() if picked] == [1, 2, 3, 4, 7, 10]
    # Its first two silences cost a round each (nothing yet said it would not answer);
    # by its third, its picks say so: the round closes at the soft deadline without it.
    assert {n for n, (_, status, _) in rounds.items() if status == "ABANDONED"} == {2, 4}
    assert rounds[10] == (True, "CLOSED", "soft")
    record = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table).get("flaky")
    assert record is not None
    assert (record.rounds_answered, record.rounds_missed, record.last_round) == (3, 3, 10)


def test_an_honest_slow_device_is_waited_for_while_a_doubtful_one_is_not(stack: Stack) -> None:
    """Past the soft deadline the round waits for "slow" (it answers every pick) but not for
    "flaky" (two of its last three picks missed): it closes once "slow" answers."""
    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
    stack.register("flaky")
    for number, answered in ((1, False), (2, True), (3, False)):  # the server's counts
        assert registry.record_round("flaky", number, answered=answered, turnaround=9.0, b=0.5)
    stack.config = stack.config.replace(quorum="all_answered")
    averager, clock, store = _setup(stack, "a", "slow", "flaky", quorum="all_answered")
    _answer(stack, averager, store, "a", 1)

    clock.now += 61.0  # past the soft deadline: "slow" has not answered yet
    averager.tick()
    waiting = store.get("test", 1, slots=False)
    assert waiting is not None and waiting.status is RoundState.OPEN

    clock.now += 30.0  # before the hard deadline
    _answer(stack, averager, store, "slow", 1)

    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert sorted(closed.accepted) == ["a", "slow"]


def test_misses_are_counted_over_the_window_not_in_a_row() -> None:
    alternating = EMPTY_HISTORY
    for missed in (False, True, False, True, False):
        alternating = record_pick(alternating, missed=missed)
    assert bench_rounds(alternating, 8) == 2  # two misses among its last five picks
    assert is_doubtful(alternating, 8)
    steady = EMPTY_HISTORY
    for missed in (True, False, False, False, False, False, False, False, False):
        steady = record_pick(steady, missed=missed)
    assert bench_rounds(steady, 8) == 0 and not is_doubtful(steady, 8)  # one old miss
    assert bench_rounds(history_from_streak(3), 8) == 4  # a record from before histories
    full = EMPTY_HISTORY
    for _ in range(40):
        full = record_pick(full, missed=True)
    assert full < 1 << 17 and bench_rounds(full, 16) == 32  # bounded, like the bench


def test_stored_histories_a_device_could_not_have_written_read_as_empty() -> None:
    from sfl.core.liveness import valid_history

    for junk in (0, -5, 1 << 40, True, "1", 2.5, None):
        assert valid_history(junk) == EMPTY_HISTORY
