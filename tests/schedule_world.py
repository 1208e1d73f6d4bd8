"""A local deployment driven one schedule step at a time: what the invariant tests of both
modes share (tests/test_invariants.py for rounds, tests/test_buffered_invariants.py for
buffered mode).

The world holds the clock, the uploads whose S3 events have not been delivered yet, and the
ETags of honest uploads, and it runs the real averager with the crashes the schedule planned.
A mode's world adds what differs: what it initiates, which key an upload answers, and the
invariants it checks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import sfl.learning.rules.aggregation as aggregation
from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.learning import codec
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.server.notifications import UpdateEvent
from sfl.state.aws import AwsClients
from sfl.state.registry import ClientRegistry

MODEL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
#: The schedule's actions every world knows; a mode's world adds its own (``act``).
DELIVERIES = ("deliver", "duplicate", "drop")


def schedule_settings(examples: int) -> settings:
    """Hypothesis's settings for ``examples`` schedules: derandomized, so CI runs the same
    schedules every time and never flakes on a new one; a world is slow and fixture-built."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def schedules(actions: Sequence[str], *, min_size: int) -> st.SearchStrategy[list[tuple[str, int]]]:
    """Schedules of ``min_size`` to 45 steps: an action, and a number that picks its target."""
    return st.lists(
        st.tuples(st.sampled_from(actions), st.integers(0, 2**16)), min_size=min_size, max_size=45
    )


class _Crash(aggregation.FedAvg):
    def result(self) -> dict[str, torch.Tensor] | None:
        raise RuntimeError("averager crashed mid-aggregation")


class ScheduleWorld:
    """One federation on fresh buckets, its model version 0 written, stepped by a schedule."""

    #: Whether an upload's event carries the time S3 stored it (else the averager takes the
    #: time it handles the event).
    stamps_uploads = False

    def __init__(
        self,
        clients: AwsClients,
        names: ResourceNames,
        config: FederationConfig,
        devices: Sequence[str],
        now: float,
    ) -> None:
        self.aws = clients
        self.names = names
        self.config = config
        self.clients = list(devices)
        self.now = now
        self.pending: list[UpdateEvent] = []
        self.honest_etags: set[str] = set()
        self.crash_next = False
        self.aws.s3.put_object(
            Bucket=self.names.models_bucket,
            Key=layout.model_key(0),
            Body=codec.encode_model(MODEL, version=0),
        )

    def clock(self) -> float:
        return self.now

    def averager(self) -> Averager:
        return Averager(self.aws, self.names, self.config, clock=self.clock)

    @contextmanager
    def planned_crashes(self) -> Iterator[None]:
        """While the averager runs: the crash the schedule planned (its rule fails)."""
        original = aggregation.FedAvg
        if self.crash_next:
            aggregation.FedAvg = _Crash  # type: ignore[misc]
        try:
            yield
        finally:
            aggregation.FedAvg = original  # type: ignore[misc]

    def crashed(self) -> None:
        """A planned crash happened: it is not planned any more."""
        self.crash_next = False

    def run_averager(self, call: Callable[[Averager], Any]) -> bool:
        """Run the averager once; False if it crashed, as planned."""
        try:
            with self.planned_crashes():
                call(self.averager())
        except RuntimeError:
            self.crashed()
            return False
        return True

    def initiate(self) -> None:
        """The devices heartbeat, then the initiator runs."""
        registry = ClientRegistry(self.aws.dynamodb, self.names.clients_table)
        for client in self.clients:
            registry.heartbeat(
                client, now=self.now, active_window_seconds=self.config.active_window_seconds
            )
        start_round(self.aws, self.names, self.config, clock=self.clock)

    def step(self, action: str, pick: int) -> None:
        rng = random.Random(pick)
        if action in DELIVERIES:
            if not self.pending:
                return
            event = self.pending[pick % len(self.pending)]  # any order
            if action != "duplicate":
                self.pending.remove(event)
            if action != "drop":
                self.run_averager(lambda a: a.handle_update(event))
        elif action == "tick":
            self.run_averager(lambda a: a.tick())
        elif action == "wait":
            self.now += rng.choice([5, 25, 35, 65])
        elif action == "crash":
            self.crash_next = True
        else:
            self.act(action, pick, rng)

    def act(self, action: str, pick: int, rng: random.Random) -> None:
        """A mode's own action (initiating, uploading)."""
        raise NotImplementedError(action)

    def put_update(
        self, client: str, number: int, base_version: int, rng: random.Random, *, honest: bool
    ) -> str:
        """Upload ``client``'s update to round (ticket) ``number``: the model scaled, or with
        a NaN if not honest. Its S3 event waits in ``pending``; returns its ETag."""
        scale = 1.0 + rng.random()
        tensors = {k: v * scale for k, v in MODEL.items()}
        if not honest:
            tensors["w"] = torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])
        meta = codec.UpdateMetadata(
            round=number,
            client_id=client,
            base_version=base_version,
            num_examples=rng.randint(1, 50),
        )
        body = codec.encode(tensors, meta.to_header())
        key = layout.update_key(client, number)
        response = self.aws.s3.put_object(Bucket=self.names.updates_bucket, Key=key, Body=body)
        etag = str(response["ETag"]).strip('"')
        stored_at = self.now if self.stamps_uploads else None
        self.pending.append(
            UpdateEvent(self.names.updates_bucket, key, len(body), etag, uploaded_at=stored_at)
        )
        return etag

    def model_writes(self) -> dict[str, int]:
        """How many times each model version's key was written (the bucket is versioned)."""
        listing = self.aws.s3.list_object_versions(
            Bucket=self.names.models_bucket, Prefix=layout.MODELS_PREFIX
        )
        writes: dict[str, int] = {}
        for v in listing.get("Versions", []):
            if layout.model_version_of(v["Key"]) is not None:
                writes[v["Key"]] = writes.get(v["Key"], 0) + 1
        return writes
