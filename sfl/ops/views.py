"""What the operator's commands show, as plain data (the ``--json`` output): read from the
round records, the registry, the control record, the models bucket and the alarms."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from sfl.core.liveness import HISTORY_PICKS, recent_misses
from sfl.ops.buffered_view import pool_status
from sfl.ops.defaults import DEFAULT_LAST
from sfl.ops.federation import Federation
from sfl.state.control import ControlStore
from sfl.state.lineage import PARALLEL_READS, LineageStore, ModelLineage, lineage_of_round
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import Outcome, Round, RoundRefusals, RoundState, RoundStore

#: Seen by no heartbeat for this long, a registry item is not listed as a device at all.
EVERYONE_SECONDS = 10.0**10
#: How many of the newest rounds ``status`` counts, and ``devices`` reads the refusals of
#: (their rejections and declines per device): the operator's everyday reads cost the same at
#: round 10 and round 10,000.
STATUS_ROUNDS = 100
DEVICE_ROUNDS = 20
#: What ``round_row`` reads of a round item (``summary.x``: only that key of its summary):
#: a round's configuration and its aggregation's report on each client stay where they are.
ROW_SUMMARY = (
    "participants", "aggregate_seconds", "client_accuracy", "client_loss", "num_examples",
    "bytes_up", "bytes_down", "model_bytes", "privacy",
)  # fmt: skip
ROW_ATTRIBUTES = (
    "experiment", "round", "status", "base_version", "model_version", "config_version",
    "created_at", "deadline_at", "soft_deadline_at", "finished_at", "train_config",
    "candidates", "aggregation_attempts", "abandon_reason", "evaluation", "selected_count",
    "answered_count", "accepted_count", "rejected_count", "declined_count", "bytes_up",
    "bytes_down", "rejection_counts", "answer_rejections", "answer_declines",
    # A round item from before slots and counters holds its clients and answers itself.
    "selected", "answers",
    *(f"summary.{key}" for key in ROW_SUMMARY),
)  # fmt: skip


class RefusedAnswer(NamedTuple):
    """Answers of a client that were not accepted updates, for one reason."""

    client_id: str
    outcome: Outcome
    reason: str
    times: int = 1


def rounds_of(fed: Federation, *, slots: bool = False) -> list[Round]:
    """Every round's record (the report's, which is about the whole history); ``slots=True``
    also reads each round's clients and answers (one query per round)."""
    return RoundStore(fed.client("dynamodb"), fed.names.rounds_table).history(
        fed.experiment, slots=slots
    )


def recent_rounds(fed: Federation, count: int | None) -> list[Round]:
    """The newest ``count`` rounds, oldest first (``None``: every round), with what
    ``round_row`` shows of them (``ROW_ATTRIBUTES``)."""
    if count is None:
        return rounds_of(fed)
    store = RoundStore(fed.client("dynamodb"), fed.names.rounds_table)
    return store.recent(fed.experiment, count, attributes=ROW_ATTRIBUTES)


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
        # DP (docs/privacy.md): what the experiment had spent after this round's version.
        "epsilon": (summary.get("privacy") or {}).get("epsilon"),
    }


def status(fed: Federation, now: float | None = None) -> dict[str, Any]:
    """The federation now: the newest ``STATUS_ROUNDS`` rounds in brief (one bounded query
    of a few attributes), the latest round and the newest a model came from (one read
    each), the control record, the registry and the alarms."""
    now = time.time() if now is None else now
    config = fed.deployed_config
    store = RoundStore(fed.client("dynamodb"), fed.names.rounds_table)
    outcomes = store.recent_outcomes(fed.experiment, STATUS_ROUNDS)  # newest first
    latest = store.get(fed.experiment, outcomes[0].round, slots=False) if outcomes else None
    control = ControlStore(fed.client("dynamodb"), fed.names.rounds_table).state(fed.experiment)
    registry = ClientRegistry(fed.client("dynamodb"), fed.names.clients_table)
    everyone = registry.everyone(now=now, active_window_seconds=EVERYONE_SECONDS)
    effective = _effective(fed, control.overrides)
    window = effective.active_window_seconds
    active = [c for c in everyone if c.last_seen >= now - window]
    closed = [
        o.round
        for o in outcomes
        if o.status == RoundState.CLOSED.value and o.model_version is not None
    ]
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
    spent = dict(last.summary.get("privacy") or {}) if last is not None else {}
    if spent:
        spent["budget"] = effective.dp_epsilon_budget
    return {
        "stack": fed.stack,
        "local": fed.local,
        "region": fed.region,
        "experiment": config.experiment,
        "round": round_row(latest, now) if latest is not None else None,
        "rounds_total": latest.round if latest is not None else 0,
        "rounds_counted": len(outcomes),  # the newest rounds the two counts below cover
        "rounds_closed": sum(o.status == RoundState.CLOSED.value for o in outcomes),
        "rounds_abandoned": sum(o.status == RoundState.ABANDONED.value for o in outcomes),
        "paused": control.paused,
        "pause_reason": control.pause_reason or None,
        "rollback_to": control.rollback_to,
        "config_version": control.config_version,
        "active_devices": len(active),
        "known_devices": len(everyone),
        "latest_model": model,
        "privacy": spent or None,  # the newest version's DP spending (docs/privacy.md)
        "promoted_version": control.promoted_version,
        "alarms": alarms(fed),
        "dashboard": fed.outputs.get("DashboardUrl"),
        "now": now,
        "buffered": pool_status(fed, now) if config.mode == "buffered" else None,
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
    """Every client in the registry: what the server counted for it (its registry item:
    picks, answers, misses, turnaround, the outcomes of its last picks), and the reasons its
    uploads were rejected or its answers declined in the newest ``DEVICE_ROUNDS`` rounds.

    Reads the registry, one bounded query of a few attributes of those rounds' items, and
    the refused answers of only the rounds that counted any (their refused slots): what it
    costs grows with the fleet and with what went wrong lately, never with the history."""
    now = time.time() if now is None else now
    control = ControlStore(fed.client("dynamodb"), fed.names.rounds_table).state(fed.experiment)
    effective = _effective(fed, control.overrides)
    window = effective.active_window_seconds
    registry = ClientRegistry(fed.client("dynamodb"), fed.names.clients_table)
    records = registry.everyone(now=now, active_window_seconds=EVERYONE_SECONDS)
    store = RoundStore(fed.client("dynamodb"), fed.names.rounds_table)
    rejected: dict[str, Counter[str]] = {}
    declined: dict[str, Counter[str]] = {}
    for outcome in store.recent_refusals(fed.experiment, DEVICE_ROUNDS):
        for answer in refused_answers(store, fed.experiment, outcome):
            said = declined if answer.outcome is Outcome.DECLINED else rejected
            reason = answer.reason.split(":")[0]
            said.setdefault(answer.client_id, Counter())[reason] += answer.times
    rows = []
    for c in records:
        misses, picks = recent_misses(c.miss_history, HISTORY_PICKS)
        rows.append(
            {
                "client_id": c.client_id,
                "active": c.last_seen >= now - window,
                "last_seen": c.last_seen,
                "last_seen_seconds_ago": max(0.0, now - c.last_seen),
                "registered_at": c.registered_at,
                "ewma_turnaround": c.ewma_turnaround,
                "rounds_picked": c.rounds_answered + c.rounds_missed,
                "rounds_answered": c.rounds_answered,
                "rounds_missed": c.rounds_missed,
                "last_round": c.last_round or None,  # the last round counted for it
                "recent_picks": picks,  # its last picks (at most HISTORY_PICKS) ...
                "recent_misses": misses,  # ... and how many of them it missed
                "missed_streak": c.missed_streak,
                "rejected": dict(sorted(rejected.get(c.client_id, Counter()).items())),
                "declined": dict(sorted(declined.get(c.client_id, Counter()).items())),
            }
        )
    return rows


def refused_answers(
    store: RoundStore, experiment: str, brief: RoundRefusals
) -> list[RefusedAnswer]:
    """A round's refused answers, by client: its refused slots, read only if its item
    counted any; a round item from before slots and counters holds its answers and its
    other uploads' rejections itself (one read)."""
    if brief.refused is not None and not brief.strays:
        if not brief.refused:
            return []
        return [
            RefusedAnswer(slot.client_id, slot.answer.outcome, slot.answer.reason)
            for slot in store.slots(experiment, brief.round, only="refused")
            if slot.answer is not None and slot.answer.outcome is not Outcome.ACCEPTED
        ]
    r = store.get(experiment, brief.round, slots=False)
    if r is None:
        return []
    found = [
        RefusedAnswer(client, a.outcome, a.reason)
        for client, a in r.answers.items()
        if a.outcome is not Outcome.ACCEPTED
    ]
    found.extend(
        RefusedAnswer(
            str(o.get("client_id")),
            Outcome.REJECTED,
            str(o.get("reason", "")),
            int(o.get("count", 1)),
        )
        for o in r.other_rejections
    )
    return found


def models(fed: Federation, last: int | None = DEFAULT_LAST) -> list[dict[str, Any]]:
    """The newest ``last`` global model versions (``None``: every one) with their lineage
    (from its record, else its round)."""
    store = LineageStore(fed.aws, fed.names)
    rounds = RoundStore(fed.client("dynamodb"), fed.names.rounds_table)
    outcomes = rounds.recent_outcomes(fed.experiment, last if last is not None else 10**9)
    by_version = {
        o.model_version: o.round
        for o in outcomes
        if o.status == RoundState.CLOSED.value and o.model_version is not None
    }
    if last is None:
        versions = store.versions()
    else:
        # A version known to exist near the newest: one a round wrote, or started from (a
        # round's base, even an abandoned one's, is the newest version when it started).
        known = max([*by_version, *(o.base_version for o in outcomes)], default=0)
        versions = store.newest_versions(known, last)
    control = ControlStore(fed.client("dynamodb"), fed.names.rounds_table).state(fed.experiment)
    with ThreadPoolExecutor(max_workers=PARALLEL_READS) as pool:
        records = dict(zip(versions, pool.map(store.get, versions), strict=True))
    rows = []
    for version, obj in versions.items():
        lineage = records[version]
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
