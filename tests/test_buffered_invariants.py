"""Buffered mode's invariants under randomised schedules, against the emulator.

Hypothesis interleaves initiator runs, honest and bad uploads (and uploads to another
device's ticket), S3 event deliveries that are duplicated, reordered or dropped, watchdog
ticks, clock jumps past leases, and averager crashes mid-step. After every schedule step the
invariants of docs/buffered.md hold: the counters equal the ticket items, at most
``concurrency`` tickets are open and a device holds at most one, every accepted update is in
exactly one buffer and no more than ``max_staleness`` versions behind its step, buffers fill
in order, every closed buffer made exactly one version, versions are contiguous and each
written once. At the end, with the fleet behaving and time running on, nothing is stuck.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.learning import codec
from sfl.local.emulator import LocalAws, provision, table_resource
from sfl.state.buffers import BufferState, BufferStore, Ticket, TicketState
from sfl.state.rounds import Outcome
from tests.schedule_world import ScheduleWorld, schedule_settings, schedules

CLIENTS = ["c0", "c1", "c2", "c3", "c4"]
# Weighted by repetition: mostly uploads and deliveries, so that buffers fill and step.
ACTIONS = [
    *["initiate"] * 3,
    *["upload"] * 6,
    "upload_bad",
    "upload_other",
    *["deliver"] * 7,
    "duplicate",
    "drop",
    "tick",
    "wait",
    *["crash"] * 2,
    "crash_late",
]
# 6 derandomized schedules of 15-45 steps keep this file near 30 s on an idle machine;
# SFL_INVARIANT_EXAMPLES=300 hunts longer
EXAMPLES = int(os.environ.get("SFL_INVARIANT_EXAMPLES", "6"))
SCHEDULES_RUN = 0
STATS = {
    "tickets": 0,
    "versions": 0,
    "accepted": 0,
    "too_stale": 0,
    "expired": 0,
    "crashes": 0,
    "stepped_with_staleness": 0,
}


_TABLES: dict[int, ResourceNames] = {}


def fresh_names(aws: LocalAws, number: int) -> ResourceNames:
    """The session's tables (provisioned once: each schedule is its own experiment) and two
    new buckets (model versions are per bucket)."""
    if id(aws) not in _TABLES:
        _TABLES[id(aws)] = provision(aws).names
    tables = _TABLES[id(aws)]
    s3 = aws.client("s3")
    suffix = f"{number}-{uuid.uuid4().hex[:8]}"
    models, updates = f"buf-models-{suffix}", f"buf-updates-{suffix}"
    s3.create_bucket(Bucket=models)
    s3.put_bucket_versioning(Bucket=models, VersioningConfiguration={"Status": "Enabled"})
    s3.create_bucket(Bucket=updates)
    return replace(tables, models_bucket=models, updates_bucket=updates)


def _crash_before_close(*args: Any, **kwargs: Any) -> bool:
    raise RuntimeError("averager crashed after writing the version, before closing")


class World(ScheduleWorld):
    """Buffered mode: its own experiment on the module's tables, and buckets of its own."""

    # A ticket's lease is judged by when S3 stored its answer.
    stamps_uploads = True

    def __init__(self, aws: LocalAws, number: int, clients: Sequence[str] = CLIENTS) -> None:
        config = FederationConfig(
            experiment=f"buf{number}",
            mode="buffered",
            selection="random",
            buffer_size=2,
            concurrency=4,
            max_staleness=1,
            round_deadline_seconds=60,
            round_soft_deadline_seconds=30,
            aggregation_lease_seconds=20,
        )
        # The clients table is shared by every world of this module: a world that must not
        # see the others' misses (which bench a device) names clients of its own. Each
        # schedule's clock is a day past the last one's: the clients the last schedule
        # heartbeated (the registry is shared) are long inactive.
        names = fresh_names(aws, number)
        super().__init__(aws.clients(), names, config, clients, time.time() + number * 86_400)
        self.store = BufferStore(self.aws.dynamodb, self.names.rounds_table)
        self.crash_late = False
        self.feed = aws.feed
        self.checked_at = -1

    @contextmanager
    def planned_crashes(self) -> Iterator[None]:
        """Also: the version is written, then the invocation dies before closing."""
        close = BufferStore.close
        if self.crash_late:
            BufferStore.close = _crash_before_close  # type: ignore[method-assign]
        try:
            with super().planned_crashes():
                yield
        finally:
            BufferStore.close = close  # type: ignore[method-assign]

    def crashed(self) -> None:
        super().crashed()
        self.crash_late = False
        STATS["crashes"] += 1

    def act(self, action: str, pick: int, rng: random.Random) -> None:
        if action == "initiate":
            self.initiate()
        elif action in ("upload", "upload_bad", "upload_other"):
            tickets = self.store.training(self.config.experiment)
            if not tickets:
                return
            ticket = tickets[pick % len(tickets)]
            # "upload_other": another device uploads to this ticket's number (not_selected)
            client = rng.choice(self.clients) if action == "upload_other" else ticket.client_id
            self.upload(ticket, client, rng, honest=action != "upload_bad")
        elif action == "crash_late":
            self.crash_late = True

    def upload(self, ticket: Ticket, client: str, rng: random.Random, *, honest: bool) -> None:
        etag = self.put_update(client, ticket.number, ticket.base_version, rng, honest=honest)
        if honest and client == ticket.client_id:
            self.honest_etags.add(etag)

    def check(self, *, always: bool = False) -> None:
        # Only after a step that wrote the rounds table (every state change does): each
        # check is a dozen reads.
        table_writes = self.feed.writes(table_resource(self.names.rounds_table), "")
        if table_writes == self.checked_at and not always:
            return
        self.checked_at = table_writes
        pool = self.store.pool(self.config.experiment)
        if pool is None:
            return
        tickets = self.store.tickets(self.config.experiment)
        training = self.store.training(self.config.experiment)
        by_status = {s: [t for t in tickets if t.status is s] for s in TicketState}
        answered = by_status[TicketState.ANSWERED]
        accepted = [t for t in answered if t.answer and t.answer.outcome is Outcome.ACCEPTED]
        # The counters equal the ticket items, item for item.
        assert pool.issued == len(tickets)
        assert [t.number for t in tickets] == list(range(1, pool.next_ticket))
        assert [t.number for t in training] == [t.number for t in by_status[TicketState.OPEN]]
        assert pool.training == len(training) <= self.config.concurrency
        assert pool.answered == len(answered)
        assert pool.expired == len(by_status[TicketState.EXPIRED])
        assert pool.accepted == len(accepted)
        assert pool.rejected + pool.declined + pool.accepted == pool.answered
        holders = [t.client_id for t in training]
        assert len(holders) == len(set(holders)), f"a device holds two open tickets: {holders}"
        for t in answered:
            assert t.answer is not None
            if t.answer.outcome is Outcome.ACCEPTED:
                assert t.answer.etag in self.honest_etags, f"ticket {t.number}: bad update in"
                assert t.answer.received_at <= t.deadline_at
        # Every accepted update is in exactly one buffer; buffers fill in order.
        buffers = self.store.buffers(self.config.experiment)
        assert [b.number for b in buffers] == list(range(1, len(buffers) + 1))
        seen: dict[int, int] = {}
        for b in buffers:
            members = self.store.members(self.config.experiment, b.number)
            assert b.count == len(members) <= b.size
            assert b.base_version == pool.start_version + b.number - 1
            if b.number < len(buffers):
                assert b.full, f"buffer {b.number} is not full but a later one exists"
            for m in members:
                assert m.ticket not in seen, f"ticket {m.ticket} in buffers {seen[m.ticket]}, {b}"
                seen[m.ticket] = b.number
                assert b.base_version - m.base_version <= self.config.max_staleness
        assert {t.number: t.buffer for t in accepted} == seen
        # Every closed buffer made exactly one version, in order; versions contiguous.
        closed = [b for b in buffers if b.status is BufferState.CLOSED]
        assert [b.number for b in closed] == list(range(1, len(closed) + 1))
        assert all(b.model_version == b.base_version + 1 for b in closed)
        assert pool.version == pool.start_version + len(closed)
        writes = self.model_writes()
        assert all(n == 1 for n in writes.values()), f"a version was written twice: {writes}"
        # A step that wrote its version and died before its close leaves the next version
        # written while its buffer is still AGGREGATING; the take-over keeps it.
        stepping = [b for b in buffers if b.status is BufferState.AGGREGATING]
        assert [b.number for b in stepping] in ([], [len(closed) + 1])
        expected = [layout.model_key(v) for v in range(pool.version + 1)]
        assert sorted(writes) in (
            (expected, [*expected, layout.model_key(pool.version + 1)]) if stepping else (expected,)
        ), f"versions not contiguous: {sorted(writes)}"


@schedule_settings(EXAMPLES)
@given(schedules(ACTIONS, min_size=15))
def test_buffered_invariants_hold_under_random_schedules(
    local_aws: LocalAws, schedule: list[tuple[str, int]]
) -> None:
    global SCHEDULES_RUN
    SCHEDULES_RUN += 1
    world = World(local_aws, SCHEDULES_RUN)
    for action, pick in schedule:
        world.step(action, pick)
        world.check()
    # Then the fleet behaves, but for some silent devices: open tickets are answered (those
    # with an odd number expire), everything pending is delivered, and time runs on past
    # every lease.
    world.crash_next = world.crash_late = False
    for ticket in world.store.training(world.config.experiment):
        if ticket.number % 2 == 0:
            world.upload(ticket, ticket.client_id, random.Random(ticket.number), honest=True)
    for event in list(world.pending):
        world.run_averager(lambda a, e=event: a.handle_update(e))
    for _ in range(5):
        world.now += 65
        world.run_averager(lambda a: a.tick())
    world.check(always=True)
    pool = world.store.pool(world.config.experiment)
    if pool is not None:
        assert pool.training == 0, "a ticket outlived its lease"
        buffers = world.store.buffers(world.config.experiment)
        stuck = [b.number for b in buffers if b.full and b.status is not BufferState.CLOSED]
        assert not stuck, f"full buffers never made their version: {stuck}"
        tickets = world.store.tickets(world.config.experiment)
        STATS["tickets"] += len(tickets)
        STATS["stepped_with_staleness"] += sum(
            1 for b in buffers if any(k != "0" for k in b.summary.get("staleness", {}))
        )
        STATS["versions"] += pool.version - pool.start_version
        STATS["accepted"] += pool.accepted
        STATS["expired"] += pool.expired
        STATS["too_stale"] += pool.answer_rejections.get("too_stale", 0)


def test_crashed_steps_are_taken_over_and_a_buffer_that_keeps_failing_still_makes_a_version(
    local_aws: LocalAws,
) -> None:
    """Scripted: a step crashes, the watchdog takes it over once its lease expired; a buffer
    whose step fails every time makes its version unchanged after three attempts. The
    invariants hold after every step."""
    world = World(local_aws, 10_000, clients=[f"scripted{i}" for i in range(len(CLIENTS))])
    world.step("initiate", 0)
    world.crash_next = True
    for pick in range(2):
        world.step("upload", pick)
        world.check()
    while world.pending:
        world.step("deliver", 0)
        world.check()
    experiment = world.config.experiment
    first = world.store.buffer(experiment, 1)
    assert first is not None and first.status is BufferState.AGGREGATING  # crashed mid-step
    world.step("tick", 0)  # the lease still runs: nobody takes over
    assert world.store.buffer(experiment, 1) == first
    world.now += 25  # past the 20 s lease
    world.step("tick", 0)
    world.check(always=True)
    first = world.store.buffer(experiment, 1)
    assert first is not None and first.status is BufferState.CLOSED and first.attempts == 2
    assert first.summary["participants"] == 2 and "unchanged" not in first.summary

    # Buffer 2: every attempt crashes; the fourth makes version 2 unchanged, with the reason.
    world.initiate()
    for pick in range(2):
        world.step("upload", pick)
    world.crash_next = True
    while world.pending:
        world.step("deliver", 0)  # the second fills buffer 2: attempt 1 crashes
    for _ in range(2):  # attempts 2 and 3, each after the last one's lease
        world.crash_next = True
        world.now += 25
        world.step("tick", 0)
        world.check()
    world.now += 25
    world.step("tick", 0)
    world.check(always=True)
    second = world.store.buffer(experiment, 2)
    assert second is not None and second.status is BufferState.CLOSED
    assert second.summary["unchanged"] == "the step failed 3 times"
    # Buffer 3: the version is written, then the invocation dies before the close; the
    # take-over finds the version, keeps it (written once) and closes.
    world.initiate()
    newest = sorted(world.store.training(experiment), key=lambda t: -t.number)[:2]
    assert all(t.base_version == 2 for t in newest)
    for ticket in newest:
        world.upload(ticket, ticket.client_id, random.Random(ticket.number), honest=True)
    world.crash_late = True
    while world.pending:
        world.step("deliver", 0)
        world.check()
    third = world.store.buffer(experiment, 3)
    assert third is not None and third.status is BufferState.AGGREGATING
    world.now += 25
    world.step("tick", 0)
    world.check(always=True)
    third = world.store.buffer(experiment, 3)
    assert third is not None and third.status is BufferState.CLOSED
    assert third.summary["model_already_written"] is True
    models = world.aws.s3
    v1 = models.get_object(Bucket=world.names.models_bucket, Key=layout.model_key(1))
    v2 = models.get_object(Bucket=world.names.models_bucket, Key=layout.model_key(2))
    assert codec.decode(v2["Body"].read())["w"].equal(codec.decode(v1["Body"].read())["w"])


def test_every_requested_schedule_ran_and_the_count_is_reported(capsys: Any) -> None:
    """Hypothesis ran every schedule asked for; the count and totals are printed."""
    if SCHEDULES_RUN == 0:
        pytest.skip("the property test did not run in this session")
    with capsys.disabled():
        print(f"\nbuffered schedules run in this session: {SCHEDULES_RUN}; totals: {STATS}")
    assert SCHEDULES_RUN >= EXAMPLES
