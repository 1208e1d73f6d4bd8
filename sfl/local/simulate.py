"""``sfl simulate``: N edge clients, the two Lambda handlers, S3 and DynamoDB on one machine.

A ``LocalFederation`` runs the endpoint, the handlers and the S3-event delivery; here the
initiator is chained as soon as a round finishes (EventBridge rules never fire in the
emulator), the clients are real ``EdgeClient`` loops (with optional faults and attackers),
and each new global model is scored on the task's held-out test split.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_client.settings import ClientSettings
from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.learning.splits import default_client_ids, write_client_splits
from sfl.learning.tasks import configured_task
from sfl.learning.tasks.base import ArrayDataset, TrainingTask
from sfl.learning.weights import read_weights
from sfl.local.attacks import HostileTask
from sfl.local.device import run_client
from sfl.local.emulator import LocalAws, table_resource
from sfl.local.faults import FaultLog, FaultPlan, client_hooks, reset_averager_crash
from sfl.local.federation import LocalFederation
from sfl.local.workers import ClientProcesses
from sfl.state.buffers import Buffer, BufferStore
from sfl.state.lineage import LineageStore
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import Round, RoundState

#: How often a woken-up local client still polls on its own: the wake-up, not this, is what
#: starts its rounds; the poll is the device's behaviour, kept as a fallback.
WAKE_FALLBACK_POLL_SECONDS = 2.0


#: From this many clients on, ``sfl simulate`` runs them in worker processes by default.
PROCESS_CLIENTS_FROM = 16

logger = logging.getLogger(__name__)


class SimulationError(RuntimeError):
    """The simulation could not run to the end (clients never registered, a round hung)."""


@dataclass(frozen=True)
class SimulationOptions:
    out: Path
    clients: int = 10
    rounds: int = 15
    task: str = "digits"
    task_params: str = "{}"  # a JSON object; its root (if any) is the data dealt out
    partition: str = "dirichlet"
    alpha: float = 0.5
    labels_per_client: int = 2
    fraction: float = 1.0
    selection: str = "fast_clients"
    local_epochs: int = 2
    lr: float = 0.05
    batch_size: int = 16
    seed: int = 0
    poll_seconds: float = 0.1
    tick_seconds: float = 1.0
    soft_deadline_seconds: int = 60
    round_timeout_seconds: int = 120
    lease_seconds: int = 5
    averager_concurrency: int = 4
    duplicate_deliveries: int = 0
    drop_events: float = 0.0
    crash_rate: float = 0.0
    straggler_rate: float = 0.0
    slow_clients: float = 0.0
    averager_crash: bool = False
    attackers: int = 0
    attack: str = "scale"
    config_overrides: tuple[tuple[str, str], ...] = ()
    #: The user's own weights as version 0 (safetensors, or a weights-only state dict).
    init_from: Path | None = None
    #: Clients wake when the assignment is written (``ChangeFeed``) and otherwise poll only
    #: every ``WAKE_FALLBACK_POLL_SECONDS``; False: they poll every ``poll_seconds``.
    wake_ups: bool = True
    #: Worker processes the clients run in; 0: threads of this process; None: one per core
    #: from ``PROCESS_CLIENTS_FROM`` clients on (below that, starting processes costs more).
    client_processes: int | None = None

    def worker_processes(self) -> int:
        if self.client_processes is not None:
            return self.client_processes
        return (os.cpu_count() or 1) if self.clients >= PROCESS_CLIENTS_FROM else 0

    def client_poll_seconds(self) -> float:
        return (
            max(self.poll_seconds, WAKE_FALLBACK_POLL_SECONDS)
            if self.wake_ups
            else self.poll_seconds
        )

    def federation_config(self) -> FederationConfig:
        return FederationConfig(
            task=self.task,
            task_params=self.task_params,
            selection=self.selection,
            fraction=self.fraction,
            local_epochs=self.local_epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            poll_seconds=self.poll_seconds,
            heartbeat_seconds=5,
            round_soft_deadline_seconds=min(self.soft_deadline_seconds, self.round_timeout_seconds),
            round_deadline_seconds=self.round_timeout_seconds,
            aggregation_lease_seconds=self.lease_seconds,
            aggregation="sfl.local.faults:CrashOnceFedAvg" if self.averager_crash else "fedavg",
        ).with_overrides(dict(self.config_overrides))

    def fault_plan(self) -> FaultPlan:
        return FaultPlan(
            crash_rate=self.crash_rate,
            straggler_rate=self.straggler_rate,
            slow_sigma=self.slow_clients,
            seed=self.seed,
        )


@dataclass
class SimulationResult:
    rounds: list[dict[str, Any]]
    history_path: Path
    plot_path: Path | None
    initial_accuracy: float
    wall_seconds: float
    invocations: dict[str, int] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float | None:
        closed = [r["accuracy"] for r in self.rounds if r["accuracy"] is not None]
        return closed[-1] if closed else None


ProgressFn = Callable[[dict[str, Any]], None]
#: What ``<out>/history.json`` of a simulation holds (docs/history-json.md); the number grows
#: when a field changes meaning or goes, not when one is added.
SIMULATION_SCHEMA = "sfl-simulation-history/1"
#: What the simulation is doing right now, in a few words (set-up steps, then the open round's
#: answers about once a second): for a live status line.
ActivityFn = Callable[[str], None]
# How often the open round's answers are read for the status line.
ACTIVITY_SECONDS = 1.0


def run_simulation(
    options: SimulationOptions,
    progress: ProgressFn | None = None,
    activity: ActivityFn | None = None,
) -> SimulationResult:
    torch.set_num_threads(1)  # many clients share two cores: no intra-op oversubscription
    wall_start = time.time()
    plan = options.fault_plan()
    reset_averager_crash()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    say = activity or (lambda _: None)
    config = options.federation_config()
    say(f"loading task {options.task}")
    task = configured_task(config)
    # Checked before anything starts: a file that does not fit the model costs no set-up.
    start_weights = (
        read_weights(options.init_from, task.build_model(seed=config.seed).state_dict())
        if options.init_from is not None
        else None
    )
    test = task.load_central_data().test
    client_ids = default_client_ids(options.clients)
    say(f"splitting the data over {options.clients} clients ({options.partition})")
    write_client_splits(
        task,
        out / "data",
        options.clients,
        options.partition,
        options.seed,
        alpha=options.alpha,
        labels_per_client=options.labels_per_client,
        client_ids=client_ids,
    )

    say("starting the local AWS endpoint (moto) and both functions")
    with LocalFederation(
        config,
        tick_seconds=options.tick_seconds,
        log_path=out / "lambda-logs.jsonl",
        averager_concurrency=options.averager_concurrency,
        extra_deliveries=options.duplicate_deliveries,
        drop_rate=options.drop_events,
        seed=options.seed,
    ) as federation:
        if start_weights is not None:  # before round 1: version 0 is the user's
            LineageStore(federation.clients, federation.names).start_from(
                start_weights.model_bytes(),
                source=start_weights.source(),
                now=time.time(),
                replace=True,
            )
        return _run(
            options, task, test, client_ids, federation, progress, wall_start, plan, activity
        )


def _run(
    options: SimulationOptions,
    task: TrainingTask,
    test: ArrayDataset,
    client_ids: list[str],
    federation: LocalFederation,
    progress: ProgressFn | None,
    wall_start: float,
    plan: FaultPlan,
    activity: ActivityFn | None = None,
) -> SimulationResult:
    config = federation.config
    names = federation.names
    control = federation.clients
    aws = federation.aws

    stop = threading.Event()
    faults = FaultLog()
    slowdowns: dict[str, float] = {}
    threads = []
    attackers = set(client_ids[: options.attackers])
    hostile = HostileTask(task, options.attack) if attackers else None
    processes = options.worker_processes()
    clients: list[tuple[ClientSettings, bool]] = []
    for cid in client_ids:
        settings = federation.client_settings(
            cid,
            data_dir=options.out / "data" / cid,
            task=options.task,
            poll_seconds=options.client_poll_seconds(),
        )
        clients.append((settings, cid in attackers))
        hooks, slowdowns[cid] = client_hooks(plan, cid, faults, stop)
        if processes:
            continue
        wake = federation.assignment_wake_up(stop) if options.wake_ups else None
        thread = threading.Thread(
            target=run_client,
            args=(
                settings,
                aws.clients,
                hostile if hostile is not None and cid in attackers else task,
                stop,
                hooks,
                config.round_deadline_seconds,
                wake,
            ),
            name=cid,
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    workers: ClientProcesses | None = None
    if processes:
        workers = ClientProcesses(
            clients,
            processes=processes,
            task=options.task,
            task_params=config.task_params,
            attack=options.attack,
            plan=plan,
            env=aws.env(),
            restart_after=config.round_deadline_seconds,
            wake_ups=options.wake_ups,
            faults=faults,
        ).start()
        relay = threading.Thread(
            target=_relay_wake_ups,
            args=(aws, names.models_bucket, workers, stop),
            name="wake-relay",
            daemon=True,
        )
        relay.start()
        threads.append(relay)

    rows: list[dict[str, Any]] = []
    initial_accuracy = _evaluate_version(task, control, names.models_bucket, 0, test)["accuracy"]
    if activity is not None:
        activity(f"waiting for {len(client_ids)} clients to start and register")
        watcher = threading.Thread(
            target=_report_open_round,
            args=(federation, activity, stop),
            name="status",
            daemon=True,
        )
        watcher.start()
        threads.append(watcher)
    try:
        # Worker processes first import torch and load their data: give them longer.
        _wait_for_clients(
            control, names.clients_table, len(client_ids), config, 300.0 if processes else 60.0
        )
        if config.mode == "buffered":
            rows = _run_versions(options, task, test, federation, progress)
        while config.mode != "buffered" and len(rows) < options.rounds:
            result = federation.start_round()
            if not result["started"] and result["round"] is None:
                raise SimulationError(f"the initiator could not start a round: {result['reason']}")
            number = result["round"]
            finished = _wait_for_round(federation, number, options)
            row = history_row(finished)
            row["faults"] = faults.for_round(number)
            if finished.status is RoundState.CLOSED and finished.model_version is not None:
                scores = _evaluate_version(
                    task, control, names.models_bucket, finished.model_version, test
                )
                row.update(accuracy=scores["accuracy"], loss=scores["loss"])
            rows.append(row)
            if progress is not None:
                progress(row)
    finally:
        stop.set()
        aws.feed.wake_all()
        if workers is not None:
            workers.stop()
        for thread in threads:
            thread.join(timeout=30)
        federation.stop_events()

    # Rebuild each row from the final round record: late uploads are recorded after a
    # round finished, and belong in its history too.
    final = {
        r.round: r
        for r in (federation.rounds.history(config.experiment) if config.mode != "buffered" else [])
    }
    for i, row in enumerate(rows):
        if row["round"] in final:
            rebuilt = history_row(final[row["round"]])
            rebuilt.update(accuracy=row["accuracy"], loss=row["loss"], faults=row["faults"])
            rows[i] = rebuilt
    wall_seconds = time.time() - wall_start
    dispatcher, averager = federation.dispatcher, federation.averager
    history: dict[str, Any] = {
        "schema": SIMULATION_SCHEMA,
        "task": options.task,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "config": config.to_dict(),
        "initial_accuracy": initial_accuracy,
        "wall_seconds": wall_seconds,
        "averager_invocations": dispatcher.invocations,
        "averager_failures": dispatcher.failures,
        "tick_failures": averager.scheduled_failures,
        "events_dropped": sorted(dispatcher.dropped),
        "client_slowdowns": slowdowns,
        "attackers": sorted(attackers),
        "model_writes": _model_writes(control, names.models_bucket),
        "rounds": rows,
    }
    history_path = options.out / "history.json"
    history_path.write_text(json.dumps(history, indent=2) + "\n")
    plot_path = options.out / "rounds.png"
    from sfl.local.plot import plot_history

    plot_history(history, plot_path)
    return SimulationResult(
        rounds=rows,
        history_path=history_path,
        plot_path=plot_path,
        initial_accuracy=initial_accuracy,
        wall_seconds=wall_seconds,
        invocations={
            "averager": dispatcher.invocations,
            "failures": dispatcher.failures,
            "tick_failures": averager.scheduled_failures,
        },
    )


def _run_versions(
    options: SimulationOptions,
    task: TrainingTask,
    test: ArrayDataset,
    federation: LocalFederation,
    progress: ProgressFn | None,
) -> list[dict[str, Any]]:
    """Buffered mode (docs/buffered.md): keep the training places filled (the initiator, as
    the averager chains it on AWS), tick the watchdog, and score each new version until
    ``options.rounds`` versions are made. One row per version."""
    config = federation.config
    store = BufferStore(federation.clients.dynamodb, federation.names.rounds_table)
    resource = table_resource(federation.names.rounds_table)
    rows: list[dict[str, Any]] = []
    started = time.time()
    previous_at = started
    next_tick = started + options.tick_seconds
    # A version must come within the lease of a ticket and a minute, or the run is stuck.
    patience = options.round_timeout_seconds + 60
    seen = federation.aws.feed.writes(resource, "")
    made_at = time.time()
    federation.start_round()
    pool = store.pool(config.experiment)
    if pool is None:
        raise SimulationError("the initiator could not open the ticket pool")
    done = pool.start_version
    while len(rows) < options.rounds:
        pool = store.pool(config.experiment) or pool
        if pool.training < config.concurrency:
            federation.start_round()
        if time.time() >= next_tick:
            federation.tick()
            next_tick = time.time() + options.tick_seconds
        for number in range(done - pool.start_version + 1, pool.version - pool.start_version + 1):
            buffer = store.buffer(config.experiment, number)
            if buffer is None or buffer.model_version is None:
                break
            now = time.time()
            scores = _evaluate_version(
                task, federation.clients, federation.names.models_bucket, buffer.model_version, test
            )
            row = version_row(buffer, scores, seconds=now - previous_at, at=now - started)
            previous_at = now
            made_at = now
            done = buffer.model_version
            rows.append(row)
            if progress is not None:
                progress(row)
            if len(rows) >= options.rounds:
                break
        if time.time() - made_at > patience:
            raise SimulationError(f"no new version within {patience} s (version {done})")
        seen = federation.aws.feed.wait(resource, "", seen, 0.2)
    return rows


def version_row(
    buffer: Buffer, scores: dict[str, float], *, seconds: float, at: float
) -> dict[str, Any]:
    """One version of a buffered run's ``history.json``, with the fields a round's row has
    that ``plot_history`` reads (``round`` is the version)."""
    summary = dict(buffer.summary)
    return {
        "round": buffer.model_version,
        "buffer": buffer.number,
        "status": str(buffer.status),
        "base_version": buffer.base_version,
        "model_version": buffer.model_version,
        "participants": summary.get("participants"),
        "staleness": summary.get("staleness", {}),
        "staleness_mean": summary.get("staleness_mean"),
        "unchanged": summary.get("unchanged"),
        "accuracy": scores["accuracy"],
        "loss": scores["loss"],
        "client_accuracy": summary.get("client_accuracy"),
        "client_loss": summary.get("client_loss"),
        "num_examples": summary.get("num_examples", 0),
        "seconds_since_start": at,
        "timings": {"total": seconds, "train": None, "aggregate": summary.get("aggregate_seconds")},
        "overhead_seconds": None,
        "aggregation_attempts": buffer.attempts,
        "clipped": list(summary.get("clipped", [])),
        "cost": summary.get("cost"),  # estimated dollars, as a round's (sfl.core.cost)
    }


def _report_open_round(
    federation: LocalFederation, activity: ActivityFn, stop: threading.Event
) -> None:
    """The open round's answers so far, about once a second, until the simulation ends."""
    experiment = federation.config.experiment
    while not stop.wait(ACTIVITY_SECONDS):
        try:
            latest = federation.rounds.latest(experiment, slots=False)
        except Exception as e:  # a status line is never worth failing a simulation for
            logger.debug("status line skipped", extra={"error": type(e).__name__})
            continue
        if latest is None or latest.status is not RoundState.OPEN:
            continue
        elapsed = time.time() - latest.created_at
        activity(
            f"round {latest.round}: {latest.answered_count}/{latest.selected_count} picked "
            f"clients answered ({latest.accepted_count} accepted), {elapsed:.0f} s"
        )


def _relay_wake_ups(
    aws: LocalAws, bucket: str, workers: ClientProcesses, stop: threading.Event
) -> None:
    """Pass the emulator's assignment writes on to the worker processes' clients."""
    seen = aws.feed.writes(bucket, layout.ASSIGNMENT_KEY)
    while not stop.is_set():
        now = aws.feed.wait(bucket, layout.ASSIGNMENT_KEY, seen, 1.0, stop)
        if now > seen:
            seen = now
            workers.notify()


def _model_writes(control: Any, bucket: str) -> dict[str, int]:
    """How many times each global model version's key was written (the bucket is versioned;
    the versions' lineage records beside them are not counted)."""
    counts: dict[str, int] = {}
    paginator = control.s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket, Prefix=layout.MODELS_PREFIX):
        for version in page.get("Versions", []):
            if layout.model_version_of(version["Key"]) is not None:
                counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return dict(sorted(counts.items()))


def _wait_for_clients(
    control: Any, table: str, expected: int, config: FederationConfig, timeout: float
) -> None:
    registry = ClientRegistry(control.dynamodb, table)
    deadline = time.time() + timeout
    while time.time() < deadline:
        active = registry.active(
            now=time.time(), active_window_seconds=config.active_window_seconds
        )
        if len(active) >= expected:
            return
        time.sleep(0.05)
    raise SimulationError(
        f"only {len(active)} of {expected} clients registered within {timeout:.0f} s"
    )


def _wait_for_round(federation: LocalFederation, number: int, options: SimulationOptions) -> Round:
    """The finished round's record; a round that outlives its deadline by a minute stops
    the simulation."""
    timeout = options.round_timeout_seconds + 60
    if federation.wait_for_round(number, timeout=timeout).finished:
        finished = federation.rounds.get(federation.config.experiment, number)
        if finished is not None and finished.status.finished:
            return finished
    averager = federation.averager
    failed = ""
    if averager.scheduled_failures:
        failed = (
            f"; {averager.scheduled_failures} averager tick(s) failed, the last with "
            f"{averager.last_scheduled_error} (tracebacks in lambda-logs.jsonl)"
        )
    raise SimulationError(f"round {number} did not finish within {timeout} s{failed}")


def _evaluate_version(
    task: TrainingTask, control: Any, bucket: str, version: int, test: ArrayDataset
) -> dict[str, float]:
    from sfl.server.evaluation import score_version  # the averager's held-out scoring, too

    scores = score_version(task, control, bucket, version, test)
    return {"accuracy": scores["accuracy"], "loss": scores["loss"]}


def history_row(r: Round) -> dict[str, Any]:
    """One round of ``history.json``: who took part, what happened, how long each phase took."""
    accepted = r.accepted
    summary = dict(r.summary)

    def slowest(phase: str) -> float | None:
        values = [a.timings[phase] for a in accepted.values() if phase in a.timings]
        return max(values) if values else None

    total = (r.finished_at - r.created_at) if r.finished_at else None
    slowest_train = slowest("train_s")
    answered = set(r.answers)
    return {
        "round": r.round,
        "status": str(r.status),
        "base_version": r.base_version,
        "model_version": r.model_version,
        "selected": list(r.selected),
        "candidates": r.candidates,
        "accepted": list(accepted),
        "rejected": [{"client_id": c, "reason": a.reason} for c, a in r.rejected.items()]
        + [
            {"client_id": x.get("client_id"), "reason": x.get("reason"), "counted": False}
            for x in r.other_rejections
        ],
        "declined": [{"client_id": c, "reason": a.reason} for c, a in r.declined.items()],
        "missing": [c for c in r.selected if c not in answered],
        "late": [
            x.get("client_id")
            for x in r.other_rejections
            if x.get("reason") in ("round_not_open", "past_deadline")
        ],
        "abandon_reason": r.abandon_reason or None,
        "accuracy": None,
        "loss": None,
        "client_accuracy": summary.get("client_accuracy"),
        "client_loss": summary.get("client_loss"),
        "num_examples": summary.get("num_examples", 0),
        "timings": {
            "select": r.select_seconds,
            "download": slowest("download_s"),
            "train": slowest_train,
            "upload": slowest("upload_s"),
            "aggregate": summary.get("aggregate_seconds"),
            "total": total,
        },
        "overhead_seconds": (total - slowest_train)
        if total is not None and slowest_train is not None
        else None,
        "bytes_up": summary.get("bytes_up", r.bytes_up),
        "bytes_down": summary.get("bytes_down", r.bytes_down),
        "aggregation_attempts": r.aggregation_attempts,
        "clipped": list(summary.get("clipped", [])),
        "rejection_counts": dict(r.rejection_counts),
        "cost": summary.get("cost"),  # estimated dollars, sfl.core.cost (None: abandoned)
        # DP (docs/privacy.md): the Poisson draw's q, N and q x N, and epsilon and delta so far.
        "sampling": dict(r.sampling) or None,
        "privacy": summary.get("privacy"),
    }
