"""What the operator's commands show, as plain data (the ``--json`` output): read from the
round records, the registry, the control record, the models bucket and the alarms."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from sfl.ops.federation import Federation
from sfl.state.control import ControlStore
from sfl.state.lineage import LineageStore, ModelLineage, lineage_of_round
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import Round, RoundState, RoundStore

#: Seen by no heartbeat for this long, a registry item is not listed as a device at all.
EVERYONE_SECONDS = 10.0**10
#: How many of the newest rounds ``status`` counts, and ``devices`` reads each device's
#: answers from: the operator's everyday reads cost the same at round 10 and round 10,000.
STATUS_ROUNDS = 100
DEVICE_ROUNDS = 20
#: What ``rounds`` and ``models list`` show unless asked for more.
DEFAULT_LAST = 20


def rounds_of(fed: Federation, *, slots: bool = False) -> list[Round]:
    """Every round's record (the report's, which is about the whole history); ``slots=True``
    also reads each round's clients and answers (one query per round)."""
    return RoundStore(fed.aws.dynamodb, fed.names.rounds_table).history(fed.experiment, slots=slots)


def recent_rounds(fed: Federation, count: int | None, *, slots: bool = False) -> list[Round]:
    """The newest ``count`` rounds, oldest first (``None``: every round)."""
    if count is None:
        return rounds_of(fed, slots=slots)
    store = RoundStore(fed.aws.dynamodb, fed.names.rounds_table)
    return store.recent(fed.experiment, count, slots=slots)


def round_row(r: Round, now: float | None = None) -> dict[str, Any]:
    """One round for ``sfl rounds``, ``sfl watch`` and the report."""
    now = time.time() if now is None else now
    end = r.finished_at if r.finished_at is not None else now
    reasons = Counter(r.rejection_reasons)
    reasons.update({k: int(v) for k, v in r.rejection_counts.items()})
    summary = r.summary
    return {
        "round": r.round,
        "status": str(r.status),
        "base_version": r.base_version,
        "model_version": r.model_version,
        "config_version": r.config_version,
        "selected": r.num_selected,
        "answered": r.num_answered,
        "accepted": r.num_accepted,
        "rejected": sum(reasons.values()),
        "rejections": dict(sorted(reasons.items())),
        "declined": r.num_declined,
        "declines": dict(sorted(r.decline_reasons.items())),
        "other_uploads": sum(int(v) for v in r.rejection_counts.values()),
        "participants": summary.get("participants"),
        "candidates": r.candidates,
        "started_at": r.created_at,
        "soft_deadline_at": r.soft_deadline_at,
        "deadline_at": r.deadline_at,
        "finished_at": r.finished_at,
        "duration_seconds": end - r.created_at,
        "aggregate_seconds": summary.get("aggregate_seconds"),
        "accuracy": r.evaluation.get("accuracy"),
        "loss": r.evaluation.get("loss"),
        "evaluation_error": r.evaluation.get("error"),
        "client_accuracy": summary.get("client_accuracy"),
        "client_loss": summary.get("client_loss"),
        "num_examples": summary.get("num_examples"),
        "bytes_up": summary.get("bytes_up", r.bytes_up),
        "bytes_down": summary.get("bytes_down", r.bytes_down),
        "model_bytes": summary.get("model_bytes"),
        "aggregation_attempts": r.aggregation_attempts,
        "abandon_reason": r.abandon_reason or None,
        "lr": r.train_config.get("lr"),
        "local_epochs": r.train_config.get("local_epochs"),
    }


def status(fed: Federation, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    config = fed.deployed_config
    store = RoundStore(fed.aws.dynamodb, fed.names.rounds_table)
    latest = store.latest(fed.experiment, slots=False)
    outcomes = store.recent_outcomes(fed.experiment, STATUS_ROUNDS)
    control = ControlStore(fed.aws.dynamodb, fed.names.rounds_table).state(fed.experiment)
    registry = ClientRegistry(fed.aws.dynamodb, fed.names.clients_table)
    everyone = registry.everyone(now=now, active_window_seconds=EVERYONE_SECONDS)
    window = _effective(fed, control.overrides).active_window_seconds
    active = [c for c in everyone if c.last_seen >= now - window]
    closed = [n for n, state, version in outcomes if state == "CLOSED" and version is not None]
    model: dict[str, Any] | None = None
    last = None
    if closed:
        last = latest if latest is not None and latest.round == closed[0] else None
        last = last or store.get(fed.experiment, closed[0], slots=False)
    if last is not None:
        model = {
            "version": last.model_version,
            "round": last.round,
            "accuracy": last.evaluation.get("accuracy"),
            "client_accuracy": last.summary.get("client_accuracy"),
        }
    return {
        "stack": fed.stack,
        "local": fed.local,
        "region": fed.region,
        "experiment": config.experiment,
        "round": round_row(latest, now) if latest is not None else None,
        "rounds_total": latest.round if latest is not None else 0,
        "rounds_counted": len(outcomes),  # the newest rounds the two counts below cover
        "rounds_closed": sum(state == RoundState.CLOSED.value for _, state, _ in outcomes),
        "rounds_abandoned": sum(state == RoundState.ABANDONED.value for _, state, _ in outcomes),
        "paused": control.paused,
        "pause_reason": control.pause_reason or None,
        "rollback_to": control.rollback_to,
        "config_version": control.config_version,
        "active_devices": len(active),
        "known_devices": len(everyone),
        "latest_model": model,
        "promoted_version": control.promoted_version,
        "alarms": alarms(fed),
        "dashboard": fed.outputs.get("DashboardUrl"),
        "now": now,
    }


def alarms(fed: Federation) -> list[dict[str, Any]]:
    names = fed.alarm_names
    if not names:
        return []
    found: list[dict[str, Any]] = []
    cloudwatch = fed.client("cloudwatch")
    for start in range(0, len(names), 100):
        response = cloudwatch.describe_alarms(AlarmNames=names[start : start + 100])
        found.extend(
            {"name": a["AlarmName"], "state": a["StateValue"], "reason": a.get("StateReason", "")}
            for a in response.get("MetricAlarms", [])
        )
    return sorted(found, key=lambda a: a["name"])


def devices(fed: Federation, now: float | None = None) -> list[dict[str, Any]]:
    """Every client in the registry: what the server counted for it (its registry item),
    and its answers in the newest ``DEVICE_ROUNDS`` rounds (their records)."""
    now = time.time() if now is None else now
    control = ControlStore(fed.aws.dynamodb, fed.names.rounds_table).state(fed.experiment)
    window = _effective(fed, control.overrides).active_window_seconds
    registry = ClientRegistry(fed.aws.dynamodb, fed.names.clients_table)
    records = registry.everyone(now=now, active_window_seconds=EVERYONE_SECONDS)
    picked: Counter[str] = Counter()
    accepted: Counter[str] = Counter()
    rejected: dict[str, Counter[str]] = {}
    declined: dict[str, Counter[str]] = {}
    turnaround: dict[str, list[float]] = {}
    for r in recent_rounds(fed, DEVICE_ROUNDS, slots=True):
        picked.update(r.selected)
        for client, answer in r.answers.items():
            if answer.outcome.value == "accepted":
                accepted[client] += 1
                turnaround.setdefault(client, []).append(answer.received_at - r.created_at)
            else:
                said = declined if answer.outcome.value == "declined" else rejected
                said.setdefault(client, Counter())[answer.reason.split(":")[0]] += 1
        for other in r.other_rejections:
            client = str(other.get("client_id"))
            reason = str(other.get("reason", "")).split(":")[0]
            rejected.setdefault(client, Counter())[reason] += int(other.get("count", 1))
    rows = []
    for c in records:
        samples = turnaround.get(c.client_id, [])
        rows.append(
            {
                "client_id": c.client_id,
                "active": c.last_seen >= now - window,
                "last_seen": c.last_seen,
                "last_seen_seconds_ago": max(0.0, now - c.last_seen),
                "registered_at": c.registered_at,
                "ewma_turnaround": c.ewma_turnaround,
                "last_turnaround": samples[-1] if samples else None,
                "rounds_picked": c.rounds_answered + c.rounds_missed,
                "rounds_answered": c.rounds_answered,
                "rounds_missed": c.rounds_missed,
                "recent_picked": picked[c.client_id],  # in the newest DEVICE_ROUNDS rounds
                "recent_accepted": accepted[c.client_id],
                "missed_streak": c.missed_streak,
                "rejected": dict(sorted(rejected.get(c.client_id, Counter()).items())),
                "declined": dict(sorted(declined.get(c.client_id, Counter()).items())),
            }
        )
    return rows


def models(fed: Federation, last: int | None = DEFAULT_LAST) -> list[dict[str, Any]]:
    """The newest ``last`` global model versions (``None``: every one) with their lineage
    (from its record, else its round)."""
    store = LineageStore(fed.aws, fed.names)
    rounds = RoundStore(fed.aws.dynamodb, fed.names.rounds_table)
    outcomes = rounds.recent_outcomes(fed.experiment, last if last is not None else 10**9)
    by_version = {v: n for n, state, v in outcomes if state == "CLOSED" and v is not None}
    if last is None:
        versions = store.versions()
    else:
        versions = store.newest_versions(max(by_version, default=0), last)
    control = ControlStore(fed.aws.dynamodb, fed.names.rounds_table).state(fed.experiment)
    rows = []
    for version, obj in versions.items():
        lineage = store.get(version)
        if lineage is None and version in by_version:  # written before lineage records
            produced = rounds.get(fed.experiment, by_version[version])
            lineage = lineage_of_round(produced) if produced is not None else None
        if lineage is None:
            lineage = ModelLineage(
                version=version, kind="initial" if version == 0 else "?", parent=None
            )
        row = lineage.to_dict()
        row.update(
            size=obj["size"],
            written_at=obj["written_at"].timestamp(),
            promoted=version == control.promoted_version,
            accuracy=row["metrics"].get("accuracy"),
            client_accuracy=row["metrics"].get("client_accuracy"),
        )
        rows.append(row)
    return rows


def _effective(fed: Federation, overrides: Any) -> Any:
    from sfl.state.control import effective_config

    try:
        return effective_config(fed.deployed_config, overrides)
    except ValueError:
        return fed.deployed_config
