"""What both initiators share: the published assignment read back, what a device trains
with, and the initiator's answer.

Rounds mode (``sfl.server.initiator``) and buffered mode (``sfl.server.ticketing``) publish
the assignment devices poll and read it back to see whether it is current. boto3 only, no
torch (the initiator's zip).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.state.model_store import ModelStore


@dataclass(frozen=True)
class InitiatorResult:
    started: bool
    round: int | None
    reason: str
    selected: tuple[str, ...] = ()
    open_for_seconds: float | None = None  # age of a round still unfinished, for alarms
    active_clients: int | None = None  # clients seen recently, when this run counted them

    def to_dict(self) -> dict[str, object]:
        return {
            "started": self.started,
            "round": self.round,
            "reason": self.reason,
            "selected": list(self.selected),
            "open_for_seconds": self.open_for_seconds,
            "active_clients": self.active_clients,
        }


def published_assignment(models: ModelStore) -> dict[str, Any] | None:
    """The assignment devices see now, as a JSON object (None: none, or not an object)."""
    found = models.assignment(None, layout.MAX_ASSIGNMENT_BYTES)
    if found is None:
        return None
    try:
        published = json.loads(found[0])
    except ValueError:
        return None
    return published if isinstance(published, dict) else None


def train_config(config: FederationConfig, number: int) -> dict[str, object]:
    """What a device trains round (or ticket) ``number`` with."""
    return {
        "task": config.task,
        "local_epochs": config.local_epochs,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "seed": config.seed + number,
        "proximal_mu": config.proximal_mu,
        "update_codec": config.update_codec,
        "topk_fraction": config.topk_fraction,
        "min_examples": config.min_examples,
    }
