"""Buffered mode's initiator: fill the free training places with tickets and publish them.

boto3 only, no torch (the initiator's zip). Safe to run any number of times, concurrently:
tickets are issued in one transaction that takes places only while they are free and the
ticket counter is where this run read it, so two runs never hand out the same number or more
than ``concurrency`` places. The assignment lists the OPEN tickets; a device finds its own
there as it finds a round today (docs/buffered.md).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.core.selection import (
    SelectionPolicy,
    cooled_down,
    get_selection_strategy,
    select_clients,
)
from sfl.server.assignment import InitiatorResult, published_assignment, train_config
from sfl.state.aws import AwsClients
from sfl.state.buffers import BufferStore, Pool, Ticket
from sfl.state.control import ControlStore, plan_round
from sfl.state.model_store import ModelStore
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import RoundState, RoundStore

logger = logging.getLogger(__name__)

#: The assignment's ``mode`` in buffered mode: devices read ``tickets`` instead of ``selected``.
BUFFERED_ASSIGNMENT = "buffered"


def buffered_assignment(
    pool: Pool, tickets: list[Ticket], config: FederationConfig, now: float
) -> dict[str, object]:
    """What devices poll: every OPEN ticket (client, number, base version, deadline) and the
    training settings; ``generation`` is the ticket counter it was made at."""
    return {
        "experiment": pool.experiment,
        "mode": BUFFERED_ASSIGNMENT,
        "status": "OPEN",
        "generation": pool.next_ticket,
        "created_at": now,
        "tickets": [t.assignment_entry() for t in tickets],
        "train_config": train_config(config, 0),
    }


def _published_generation(models: ModelStore) -> int | None:
    published = published_assignment(models)
    if published is not None and published.get("mode") == BUFFERED_ASSIGNMENT:
        generation = published.get("generation")
        return generation if isinstance(generation, int) else None
    return None


def open_pool(
    store: BufferStore, rounds: RoundStore, models: ModelStore, experiment: str, now: float
) -> Pool | str:
    """The experiment's pool, made on first use from where rounds left off (the newest
    version, the next number); or why it cannot be made yet."""
    pool = store.pool(experiment)
    if pool is not None:
        return pool
    latest = rounds.latest(experiment, slots=False)
    if latest is not None and not latest.status.finished:
        return f"round {latest.round} is {latest.status}: buffered mode starts after it"
    if latest is None:
        start, first = 0, 1
    elif latest.status is RoundState.CLOSED and latest.model_version is not None:
        start, first = latest.model_version, latest.round + 1
    else:
        start, first = latest.base_version, latest.round + 1
    if not models.has_model(start):
        return f"global model version {start} is not in the models bucket yet"
    return store.open_pool(experiment, start_version=start, first_ticket=first, now=now)


def issue_tickets(
    aws: AwsClients,
    names: ResourceNames,
    config: FederationConfig,
    *,
    clock: Callable[[], float] = time.time,
) -> InitiatorResult:
    """Pick devices for the free places with the configured selection rule, issue their
    tickets from the newest version, and publish the OPEN tickets when they changed."""
    store = BufferStore(aws.dynamodb, names.rounds_table)
    models = ModelStore(aws.s3, names.models_bucket)
    rounds = RoundStore(aws.dynamodb, names.rounds_table)
    found = open_pool(store, rounds, models, config.experiment, clock())
    if isinstance(found, str):
        return InitiatorResult(False, None, found)
    pool = found
    plan = plan_round(ControlStore(aws.dynamodb, names.rounds_table), config)
    if plan.refusal:
        return InitiatorResult(False, None, plan.refusal)
    if plan.rollback_to is not None:
        return InitiatorResult(False, None, "rollback is not available in buffered mode yet")
    config = plan.config
    training = store.training(config.experiment)
    free = config.concurrency - pool.training
    issued: list[Ticket] = []
    active_count: int | None = None
    if free > 0:
        started = clock()
        active = ClientRegistry(aws.dynamodb, names.clients_table).active(
            now=started, active_window_seconds=config.active_window_seconds
        )
        active_count = len(active)
        busy = {t.client_id for t in training}
        number = pool.next_ticket
        candidates = cooled_down(
            [c.candidate() for c in active if c.client_id not in busy],
            number,
            config.liveness_window,
        )
        k = min(free, len(candidates))
        if k:
            rng = random.Random(f"{config.seed}/{config.experiment}/ticket-{number}")
            picks = select_clients(
                get_selection_strategy(config.selection),
                candidates,
                k,
                rng,
                SelectionPolicy.from_config(config, number),
            )
            now = clock()
            issued = store.issue(
                pool,
                picks,
                base_version=pool.version,
                concurrency=config.concurrency,
                now=now,
                lease_seconds=config.round_deadline_seconds,
                candidates=active_count,
                select_seconds=now - started,
            )
    current = store.pool(config.experiment) or pool
    if issued or _published_generation(models) != current.next_ticket:
        open_tickets = store.training(config.experiment)
        models.put_assignment(buffered_assignment(current, open_tickets, config, clock()))
    if issued:
        logger.info(
            "tickets issued",
            extra={
                "tickets": [t.number for t in issued],
                "selected": [t.client_id for t in issued],
                "base_version": issued[0].base_version,
            },
        )
        return InitiatorResult(
            True,
            issued[-1].number,
            f"issued {len(issued)} ticket(s)",
            tuple(t.client_id for t in issued),
            active_clients=active_count,
        )
    reason = (
        f"all {config.concurrency} training places are taken"
        if free <= 0
        else "no idle active client to pick"
    )
    return InitiatorResult(False, None, reason, active_clients=active_count)
