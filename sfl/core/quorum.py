"""Quorum policies: may this round aggregate now? Pure functions over a round's counts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sfl.core import plugins
from sfl.core.config import FederationConfig


@dataclass(frozen=True)
class QuorumView:
    selected: int
    answered: int  # selected clients with an accepted or rejected update, or a decline
    accepted: int
    now: float
    created_at: float
    soft_deadline_at: float
    deadline_at: float
    # Selected clients the round still waits for: not answered, and not doubtful (a third of
    # their recent picks missed, two at least: sfl.core.liveness). None: not looked at
    # (before the soft deadline a round waits for every client).
    awaited: int | None = None

    @property
    def past_soft_deadline(self) -> bool:
        return self.now >= self.soft_deadline_at

    @property
    def past_deadline(self) -> bool:
        return self.now >= self.deadline_at


QuorumPolicy = Callable[[QuorumView, FederationConfig], bool]


def all_answered(view: QuorumView, config: FederationConfig) -> bool:
    """Every selected client answered (a rejected update is an answer too); or, past the
    soft deadline, every one but those whose history says they will not answer."""
    return view.answered >= view.selected or only_doubtful_missing(view)


def only_doubtful_missing(view: QuorumView) -> bool:
    """Past the soft deadline, the round waits for no client that answers its picks: the
    silent ones are all doubtful. So no device stalls a round by alternating answers and
    silence, and an honest slow one (never doubtful) is waited for until the hard deadline."""
    return view.past_soft_deadline and view.awaited == 0


def min_fraction(view: QuorumView, config: FederationConfig) -> bool:
    """Everyone answered; or, past the soft deadline, enough accepted updates: at least
    ``min_accepted`` and ``min_answered_fraction`` of the selected clients."""
    if all_answered(view, config):
        return True
    needed = max(config.min_accepted, math.ceil(config.min_answered_fraction * view.selected))
    return view.past_soft_deadline and view.accepted >= needed


def get_quorum_policy(name: str) -> QuorumPolicy:
    result: QuorumPolicy = plugins.load("quorum", name)
    return result
