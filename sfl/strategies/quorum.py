"""Quorum policies: may this round aggregate now? Pure functions over a round's counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sfl.config import FederationConfig
from sfl.strategies import resolve


@dataclass(frozen=True)
class QuorumView:
    selected: int
    answered: int  # selected clients with an accepted or rejected update
    accepted: int
    now: float
    created_at: float
    deadline_at: float

    @property
    def past_deadline(self) -> bool:
        return self.now >= self.deadline_at


QuorumPolicy = Callable[[QuorumView, FederationConfig], bool]


def all_answered(view: QuorumView, config: FederationConfig) -> bool:
    """Every selected client answered (a rejected update is an answer too)."""
    return view.answered >= view.selected


def min_fraction(view: QuorumView, config: FederationConfig) -> bool:
    """Everyone answered, or at the deadline at least ``min_answered_fraction`` accepted."""
    if all_answered(view, config):
        return True
    return view.past_deadline and view.accepted >= max(
        1.0, config.min_answered_fraction * view.selected
    )


QUORUM_POLICIES: dict[str, QuorumPolicy] = {
    "all_answered": all_answered,
    "min_fraction": min_fraction,
}


def get_quorum_policy(name: str) -> QuorumPolicy:
    return resolve(name, QUORUM_POLICIES, "quorum")
