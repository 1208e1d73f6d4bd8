"""What a round is, as plain records: the round item, its state, a client's slot and answer,
and what recording an answer came to. Parsing to and from DynamoDB items lives here; no
call to DynamoDB does (that is ``RoundStore``'s job)."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sfl.state.dynamo import from_item, to_item


def rejection_reason(reason: str) -> str:
    """A rejected or declined answer's reason without its detail ("shape: ..." -> "shape"):
    one of the averager's own words or of ``sfl.core.decline.DeclineReason`` (checked before
    it is recorded), so a bounded set of map keys."""
    return reason.split(":")[0][:64] or "unknown"


def rejection_key(rejection: Mapping[str, Any]) -> str:
    return f"{rejection.get('client_id')}|{rejection.get('reason')}"


class RoundState(enum.StrEnum):
    OPEN = "OPEN"
    AGGREGATING = "AGGREGATING"
    CLOSED = "CLOSED"
    ABANDONED = "ABANDONED"

    @property
    def finished(self) -> bool:
        return self in (RoundState.CLOSED, RoundState.ABANDONED)


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DECLINED = "declined"  # the client said it cannot give an update (sfl.core.decline)


@dataclass(frozen=True)
class Answer:
    """A selected client's answer to a round: an accepted update, or the reason it was
    rejected or declined ("<reason>: <detail>")."""

    outcome: Outcome
    key: str
    etag: str = ""
    size: int = 0
    reason: str = ""
    num_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    received_at: float = 0.0
    delta_norm: float = 0.0  # L2 norm of the update's change from the base model

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "key": self.key,
            "etag": self.etag,
            "size": self.size,
            "reason": self.reason,
            "num_examples": self.num_examples,
            "metrics": dict(self.metrics),
            "timings": dict(self.timings),
            "bytes_down": self.bytes_down,
            "received_at": self.received_at,
            "delta_norm": self.delta_norm,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Answer:
        return cls(
            outcome=Outcome(d["outcome"]),
            key=d.get("key", ""),
            etag=d.get("etag", ""),
            size=int(d.get("size", 0)),
            reason=d.get("reason", ""),
            num_examples=int(d.get("num_examples", 0)),
            metrics=dict(d.get("metrics", {})),
            timings=dict(d.get("timings", {})),
            bytes_down=int(d.get("bytes_down", 0)),
            received_at=float(d.get("received_at", 0.0)),
            delta_norm=float(d.get("delta_norm", 0.0)),
        )


@dataclass(frozen=True)
class Round:
    experiment: str
    round: int
    status: RoundState
    base_version: int
    selected: tuple[str, ...]
    created_at: float
    deadline_at: float
    train_config: Mapping[str, Any]
    answers: Mapping[str, Answer] = field(default_factory=dict)
    soft_deadline_at: float = 0.0  # 0: same as deadline_at
    # Uploads refused without being an answer (not selected, duplicate, late), as rounds
    # recorded them before such refusals stopped writing the round item: read, never grown.
    other_rejections: tuple[Mapping[str, Any], ...] = ()
    rejection_counts: Mapping[str, int] = field(default_factory=dict)
    norm_bound_hint: float = 0.0  # the last closed round's norm bound; 0: none yet
    candidates: int = 0
    select_seconds: float = 0.0
    # Poisson selection (docs/privacy.md): what the draw really used, which the averager's DP
    # step and the accountant read: {"rate": q, "population": N, "expected": q x N}.
    sampling: Mapping[str, float] = field(default_factory=dict)
    lease_owner: str = ""
    lease_expires_at: float = 0.0
    aggregation_attempts: int = 0
    model_version: int | None = None
    finished_at: float | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    abandon_reason: str = ""
    # The runtime configuration the round runs with (sfl.state.control): its version (0: as
    # deployed) and every key's value, so the averager judges it by the same settings.
    config_version: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    # The new model's scores on the held-out evaluation set, written after the round closed.
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    # Atomic counters on the round item, grown in the same transaction as each answer; the
    # per-client ``selected`` and ``answers`` are in slot items, loaded only on request.
    selected_count: int = 0
    answered_count: int = 0
    accepted_count: int = 0
    rejected_count: int = 0
    declined_count: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    # Seconds the averager spent judging the recorded answers (for the round's cost).
    handling_seconds: float = 0.0
    answer_rejections: Mapping[str, int] = field(default_factory=dict)  # per reason
    answer_declines: Mapping[str, int] = field(default_factory=dict)  # per decline reason
    slots_ready: bool = True  # False until the initiator wrote every slot
    slots_loaded: bool = True  # selected/answers hold the slots (False: counters only)

    @property
    def accepted(self) -> dict[str, Answer]:
        return {c: a for c, a in sorted(self.answers.items()) if a.outcome is Outcome.ACCEPTED}

    @property
    def rejected(self) -> dict[str, Answer]:
        return {c: a for c, a in sorted(self.answers.items()) if a.outcome is Outcome.REJECTED}

    @property
    def declined(self) -> dict[str, Answer]:
        return {c: a for c, a in sorted(self.answers.items()) if a.outcome is Outcome.DECLINED}

    # Counts that need no slots: the counters when stored, else the loaded slots.
    @property
    def num_selected(self) -> int:
        return self.selected_count or len(self.selected)

    @property
    def num_answered(self) -> int:
        return self.answered_count or len(self.answers)

    @property
    def num_accepted(self) -> int:
        return self.accepted_count or len(self.accepted)

    @property
    def num_rejected(self) -> int:
        return self.rejected_count or len(self.rejected)

    @property
    def num_declined(self) -> int:
        return self.declined_count or len(self.declined)

    @property
    def decline_reasons(self) -> dict[str, int]:
        """Selected clients' declines per reason: the round item's counts, or its loaded
        answers."""
        if self.answer_declines:
            return {k: int(v) for k, v in self.answer_declines.items()}
        reasons: dict[str, int] = {}
        for answer in self.declined.values():
            reason = rejection_reason(answer.reason)
            reasons[reason] = reasons.get(reason, 0) + 1
        return reasons

    @property
    def rejection_reasons(self) -> dict[str, int]:
        """Selected clients' rejected answers per reason: the round item's counts, or (a
        round written before them) its loaded answers."""
        if self.answer_rejections:
            return {k: int(v) for k, v in self.answer_rejections.items()}
        reasons: dict[str, int] = {}
        for answer in self.rejected.values():
            reason = rejection_reason(answer.reason)
            reasons[reason] = reasons.get(reason, 0) + 1
        return reasons

    def to_item(self) -> dict[str, Any]:
        return to_item(
            {
                "experiment": self.experiment,
                "round": self.round,
                "status": self.status.value,
                "base_version": self.base_version,
                "selected_count": self.num_selected,
                "answered_count": self.answered_count,
                "accepted_count": self.accepted_count,
                "rejected_count": self.rejected_count,
                "declined_count": self.declined_count,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "handling_seconds": self.handling_seconds,
                "slots_ready": self.slots_ready,
                "answer_rejections": dict(self.answer_rejections),
                "answer_declines": dict(self.answer_declines),
                "created_at": self.created_at,
                "deadline_at": self.deadline_at,
                "soft_deadline_at": self.soft_deadline_at or self.deadline_at,
                "train_config": dict(self.train_config),
                "other_rejections": {rejection_key(r): dict(r) for r in self.other_rejections},
                "rejection_counts": dict(self.rejection_counts),
                "norm_bound_hint": self.norm_bound_hint,
                "candidates": self.candidates,
                "select_seconds": self.select_seconds,
                "sampling": dict(self.sampling) or None,
                "aggregation_attempts": self.aggregation_attempts,
                "config_version": self.config_version,
                "config": dict(self.config) or None,
            }
        )

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Round:
        d = from_item(item)
        # A round written before slots existed holds its clients and answers itself.
        legacy = "selected" in d
        answers = {c: Answer.from_dict(a) for c, a in d.get("answers", {}).items()}
        selected = tuple(d.get("selected", []))
        return cls(
            experiment=d["experiment"],
            round=int(d["round"]),
            status=RoundState(d["status"]),
            base_version=int(d["base_version"]),
            selected=selected,
            created_at=float(d["created_at"]),
            deadline_at=float(d["deadline_at"]),
            soft_deadline_at=float(d.get("soft_deadline_at", d["deadline_at"])),
            train_config=d.get("train_config", {}),
            answers=answers,
            other_rejections=tuple(
                sorted(d.get("other_rejections", {}).values(), key=lambda r: r.get("at", 0.0))
            ),
            rejection_counts={k: int(v) for k, v in d.get("rejection_counts", {}).items()},
            norm_bound_hint=float(d.get("norm_bound_hint", 0.0)),
            candidates=int(d.get("candidates", 0)),
            select_seconds=float(d.get("select_seconds", 0.0)),
            sampling={str(k): float(v) for k, v in (d.get("sampling") or {}).items()},
            lease_owner=d.get("lease_owner", ""),
            lease_expires_at=float(d.get("lease_expires_at", 0.0)),
            aggregation_attempts=int(d.get("aggregation_attempts", 0)),
            model_version=d.get("model_version"),
            finished_at=d.get("finished_at"),
            summary=d.get("summary", {}),
            abandon_reason=d.get("abandon_reason", ""),
            config_version=int(d.get("config_version", 0)),
            config=d.get("config", {}),
            evaluation=d.get("evaluation", {}),
            selected_count=int(d.get("selected_count", len(selected))),
            answered_count=int(d.get("answered_count", len(answers))),
            accepted_count=int(
                d.get(
                    "accepted_count", sum(a.outcome is Outcome.ACCEPTED for a in answers.values())
                )
            ),
            rejected_count=int(
                d.get(
                    "rejected_count", sum(a.outcome is Outcome.REJECTED for a in answers.values())
                )
            ),
            declined_count=int(
                d.get(
                    "declined_count", sum(a.outcome is Outcome.DECLINED for a in answers.values())
                )
            ),
            bytes_up=int(d.get("bytes_up", sum(a.size for a in answers.values()))),
            bytes_down=int(d.get("bytes_down", sum(a.bytes_down for a in answers.values()))),
            handling_seconds=float(d.get("handling_seconds", 0.0)),
            answer_rejections={k: int(v) for k, v in d.get("answer_rejections", {}).items()},
            answer_declines={k: int(v) for k, v in d.get("answer_declines", {}).items()},
            slots_ready=bool(d.get("slots_ready", True)),
            slots_loaded=legacy,
        )

    def assignment(self, model_key: str) -> dict[str, Any]:
        """What clients see when they poll: enough to train and answer, nothing more."""
        return {
            "experiment": self.experiment,
            "round": self.round,
            "status": self.status.value,
            "base_version": self.base_version,
            "model_key": model_key,
            "selected": list(self.selected),
            "created_at": self.created_at,
            "deadline_at": self.deadline_at,
            "train_config": dict(self.train_config),
        }


def storable(value: Any) -> Any:
    """A value DynamoDB can hold: non-finite or out-of-range floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) and abs(value) < 1e100 else None
    if isinstance(value, Mapping):
        return {str(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


class RecordResult(enum.StrEnum):
    RECORDED = "recorded"
    ALREADY_ANSWERED = "already_answered"
    NOT_SELECTED = "not_selected"
    NOT_OPEN = "not_open"
    NO_SUCH_ROUND = "no_such_round"


@dataclass(frozen=True)
class RecordOutcome:
    result: RecordResult
    round: Round | None  # the round item (counters, no slots) after the attempt
    answer: Answer | None = None  # ALREADY_ANSWERED: the answer recorded before

    @classmethod
    def refused(cls, current: Round, slot: Slot | None) -> RecordOutcome:
        """Why an answer's transaction was refused, from the round and the client's slot as
        they are now: it answered before, it was not selected, or the round took no answers."""
        if slot is not None and slot.answer is not None:
            return cls(RecordResult.ALREADY_ANSWERED, current, slot.answer)
        if slot is None:
            return cls(RecordResult.NOT_SELECTED, current)
        return cls(RecordResult.NOT_OPEN, current)


@dataclass(frozen=True)
class Slot:
    """One selected client's place in a round: its answer once it answered."""

    client_id: str
    answer: Answer | None

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Slot:
        d = from_item(item)
        answer = d.get("answer")
        return cls(
            client_id=str(d.get("client_id", "")),
            answer=Answer.from_dict(answer) if isinstance(answer, Mapping) else None,
        )
