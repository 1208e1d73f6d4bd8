"""Starting rounds: pick clients and publish the assignment. boto3 only, no torch.

Safe to run any number of times, concurrently: a new round is created only when the latest
is finished (a conditional write), and a tick while a round is open only re-publishes that
round's assignment, so a crash between the writes heals on the next tick. A round is
created in three steps (its item, its clients' slots, a flag that they are all written) and
published only after the last; a round whose initiator died before the flag accepted
nothing, and the next run abandons it once its grace period is over.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace

from sfl.core import layout
from sfl.core.config import DP_SELECTION, FederationConfig
from sfl.core.resources import ResourceNames
from sfl.core.selection import (
    SelectionPolicy,
    clients_to_pick,
    cooled_down,
    get_selection_strategy,
    sampling_rate,
    select_clients,
)
from sfl.server.assignment import (
    InitiatorResult,
    published_assignment,
    train_config,
)
from sfl.server.notices import NoticePublisher, announce_round
from sfl.server.ticketing import issue_tickets
from sfl.state.aws import AwsClients
from sfl.state.control import ControlStore, plan_round
from sfl.state.lineage import LineageStore
from sfl.state.model_store import ModelStore
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import Round, RoundState, RoundStore

logger = logging.getLogger(__name__)


def publish_assignment(aws: AwsClients, names: ResourceNames, round_: Round) -> None:
    assignment = round_.assignment(layout.model_key(round_.base_version))
    ModelStore(aws.s3, names.models_bucket).put_assignment(assignment)


def assignment_published(aws: AwsClients, names: ResourceNames, round_: Round) -> bool:
    """Whether the published assignment already names this round (one small GET), so an
    open round's slots are read again only when the assignment is missing or older."""
    published = published_assignment(ModelStore(aws.s3, names.models_bucket))
    return (
        published is not None
        and published.get("experiment") == round_.experiment
        and published.get("round") == round_.round
        and published.get("created_at") == round_.created_at
    )


def model_exists(aws: AwsClients, names: ResourceNames, version: int) -> bool:
    return ModelStore(aws.s3, names.models_bucket).has_model(version)


def start_round(
    aws: AwsClients,
    names: ResourceNames,
    config: FederationConfig,
    *,
    clock: Callable[[], float] = time.time,
    notices: NoticePublisher | None = None,
) -> InitiatorResult:
    """Start the next round if the latest one is finished; otherwise say why not. In
    buffered mode: issue tickets for the free training places (``sfl.server.ticketing``).
    ``notices``: pushes a round notice once the assignment is written (None: devices poll)."""
    if config.mode == "buffered":
        return issue_tickets(aws, names, config, clock=clock)
    rounds = RoundStore(aws.dynamodb, names.rounds_table)
    latest = rounds.latest(config.experiment, slots=False)
    if (
        latest is not None
        and latest.status is RoundState.OPEN
        and not latest.slots_ready
        and rounds.abandon_unready(latest.experiment, latest.round, clock())
    ):
        logger.warning(
            "round abandoned: its slots were never all written", extra={"round": latest.round}
        )
        latest = rounds.get(latest.experiment, latest.round, slots=False)
    if latest is not None and not latest.status.finished:
        if (
            latest.status is RoundState.OPEN
            and latest.slots_ready
            and not assignment_published(aws, names, latest)
        ):
            publish_assignment(aws, names, rounds.with_slots(latest))
            announce_round(notices, latest)
        return InitiatorResult(
            False,
            latest.round,
            f"round {latest.round} is {latest.status}",
            open_for_seconds=clock() - latest.created_at,
        )

    control = ControlStore(aws.dynamodb, names.rounds_table)
    plan = plan_round(control, config)
    if plan.refusal:
        return InitiatorResult(False, latest.round if latest else None, plan.refusal)
    config = plan.config

    if latest is None:
        base_version, number = 0, 1
    elif latest.status is RoundState.CLOSED and latest.model_version is not None:
        base_version, number = latest.model_version, latest.round + 1
    else:  # abandoned: the next round starts from the same model
        base_version, number = latest.base_version, latest.round + 1

    if plan.rollback_to is not None:
        if not model_exists(aws, names, plan.rollback_to):
            return InitiatorResult(
                False, None, f"rollback: model version {plan.rollback_to} does not exist"
            )
        base_version = LineageStore(aws, names).roll_back(
            plan.rollback_to, now=clock(), after=base_version
        )

    if not model_exists(aws, names, base_version):
        return InitiatorResult(
            False, None, f"global model version {base_version} is not in the models bucket yet"
        )

    started = clock()
    active = ClientRegistry(aws.dynamodb, names.clients_table).active(
        now=started, active_window_seconds=config.active_window_seconds
    )
    if len(active) < max(1, config.min_clients):
        return InitiatorResult(
            False,
            None,
            f"{len(active)} active client(s), fewer than min_clients={config.min_clients}",
            active_clients=len(active),
        )
    candidates = cooled_down([c.candidate() for c in active], number, config.liveness_window)
    k = clients_to_pick(
        len(candidates), fraction=config.fraction, clients_per_round=config.clients_per_round
    )
    strategy = get_selection_strategy(config.selection)
    q = sampling_rate(
        len(candidates), fraction=config.fraction, clients_per_round=config.clients_per_round
    )
    policy = replace(SelectionPolicy.from_config(config, number), sampling_rate=q)
    selected = tuple(select_clients(strategy, candidates, k, selection_rng(config, number), policy))
    if not selected:
        # Poisson sampling may draw nobody: no round, nothing released; the next run (the
        # schedule's tick) draws afresh.
        return InitiatorResult(
            False,
            None,
            f"selection {config.selection!r} picked nobody of {len(candidates)} candidate(s); "
            "the next run draws again",
            active_clients=len(active),
        )
    unknown = set(selected) - {c.client_id for c in candidates}
    if unknown:
        raise ValueError(f"selection {config.selection!r} picked inactive clients {unknown}")

    now = clock()
    new = Round(
        experiment=config.experiment,
        round=number,
        status=RoundState.OPEN,
        base_version=base_version,
        selected=selected,
        created_at=now,
        deadline_at=now + config.round_deadline_seconds,
        soft_deadline_at=now + config.round_soft_deadline_seconds,
        train_config=train_config(config, number),
        candidates=len(active),
        select_seconds=now - started,
        norm_bound_hint=_norm_bound_hint(latest),
        sampling=_sampling(config, q, len(candidates)),
        config_version=plan.config_version,
        config=config.to_dict(),
    )
    if not rounds.create(new, latest):
        return InitiatorResult(False, number, f"round {number} was started by another initiator")
    if plan.rollback_to is not None:
        control.rollback_done(config.experiment, plan.rollback_to)
    publish_assignment(aws, names, new)
    announce_round(notices, new)
    logger.info(
        "round started",
        extra={"round": number, "selected": list(selected), "base_version": base_version},
    )
    return InitiatorResult(True, number, "started", selected, active_clients=len(active))


def selection_rng(config: FederationConfig, number: int) -> random.Random:
    """The round's randomness: seeded by ``seed``, experiment and round (reproducible), or with
    DP on the operating system's (``SystemRandom``), since a sample anyone can recompute
    from the configuration gives no privacy amplification (docs/privacy.md)."""
    if config.private:
        return random.SystemRandom()
    return random.Random(f"{config.seed}/{config.experiment}/{number}")


def _sampling(config: FederationConfig, rate: float, population: int) -> dict[str, float]:
    """What a Poisson draw really used, for the averager's DP step and the accountant."""
    if config.selection != DP_SELECTION:
        return {}
    return {"rate": rate, "population": float(population), "expected": rate * population}


def _norm_bound_hint(previous: Round | None) -> float:
    """The norm bound the last closed round used, carried over abandoned ones: what a round
    with too few updates for a median of its own clips to."""
    if previous is None:
        return 0.0
    bound = previous.summary.get("norm_bound") if previous.status is RoundState.CLOSED else None
    if isinstance(bound, int | float) and bound > 0:
        return float(bound)
    return previous.norm_bound_hint
