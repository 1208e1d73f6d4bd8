"""Fault injection for ``sfl simulate``: what edge devices, S3 and Lambda do to a real fleet.

Client faults plug into ``EdgeClient``'s hooks; the averager crash is an aggregation
strategy chosen by import path (the same seam a user's custom strategy uses), so no
production code path knows about faults.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from edge_client.client import Assignment, RoundHooks
from sfl.learning.rules.aggregation import FedAvg


class SimulatedCrash(Exception):
    """The client process dies before uploading (Greengrass restarts it later)."""


@dataclass(frozen=True)
class FaultPlan:
    crash_rate: float = 0.0
    straggler_rate: float = 0.0
    slow_sigma: float = 0.0  # log-normal sigma of per-client slowdown; 0 = all equally fast
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("crash_rate", "straggler_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} {value} is not in [0, 1]")
        if self.slow_sigma < 0:
            raise ValueError(f"--slow-clients {self.slow_sigma} must be >= 0")


@dataclass
class FaultLog:
    """What was done to whom, per round, for history.json."""

    events: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, round_number: int, client_id: str, fault: str, **details: Any) -> None:
        with self._lock:
            self.events.append(
                {"round": round_number, "client_id": client_id, "fault": fault, **details}
            )

    def for_round(self, round_number: int) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {k: v for k, v in e.items() if k != "round"}
                for e in self.events
                if e["round"] == round_number
            ]


def client_hooks(
    plan: FaultPlan,
    client_id: str,
    log: FaultLog,
    stop: threading.Event,
    clock: Callable[[], float] = time.time,
) -> tuple[RoundHooks, float]:
    """Hooks for one client, and its slowdown factor (deterministic per client and seed)."""
    rng = random.Random(f"{plan.seed}/{client_id}")
    slowdown = math.exp(rng.gauss(0.0, plan.slow_sigma)) if plan.slow_sigma > 0 else 1.0

    def before_upload(assignment: Assignment, train_seconds: float) -> None:
        if slowdown > 1.0:
            stop.wait(train_seconds * (slowdown - 1.0))
        draw = rng.random()
        if draw < plan.crash_rate:
            log.add(assignment.round, client_id, "crash")
            raise SimulatedCrash(f"{client_id} crashed in round {assignment.round}")
        if draw < plan.crash_rate + plan.straggler_rate:
            log.add(assignment.round, client_id, "straggler")
            stop.wait(max(0.0, assignment.deadline_at - clock()) + 0.5)

    return RoundHooks(before_upload=before_upload), slowdown


_crashed_once = threading.Event()


class CrashOnceFedAvg(FedAvg):
    """FedAvg whose first aggregation in this process dies halfway through (a Lambda
    timeout or out-of-memory); later ones, including the retry, succeed."""

    def add(self, tensors: Any, weight: float) -> None:
        super().add(tensors, weight)
        if self.count == 2 and not _crashed_once.is_set():
            _crashed_once.set()
            raise RuntimeError("simulated averager crash mid-aggregation")

    def result(self) -> dict[str, torch.Tensor] | None:
        if not _crashed_once.is_set():  # fewer than two updates: crash here instead
            _crashed_once.set()
            raise RuntimeError("simulated averager crash mid-aggregation")
        return super().result()


def reset_averager_crash() -> None:
    _crashed_once.clear()
