"""Our own control events, beside the S3 notifications the averager receives.

The stack's schedule and deploy-time bootstrap, local mode and the handlers read the events
here: ``{"sfl": "tick"}`` (the watchdog), ``{"sfl": "bootstrap"}`` (write model version 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The key of a control event that names its action.
CONTROL_KEY = "sfl"
TICK = "tick"
BOOTSTRAP = "bootstrap"
#: The schedule's tick (EventBridge sends it to both functions; a plain scheduled event is one too).
TICK_EVENT: dict[str, str] = {CONTROL_KEY: TICK}
#: Asks the averager to write global model version 0 unless it exists (deploy, local mode).
BOOTSTRAP_EVENT: dict[str, str] = {CONTROL_KEY: BOOTSTRAP}


def control_action(event: Mapping[str, Any]) -> str | None:
    """``{"sfl": "tick"}`` / ``{"sfl": "bootstrap"}``; an EventBridge scheduled event is a tick."""
    action = event.get(CONTROL_KEY)
    if isinstance(action, str):
        return action
    if event.get("detail-type") == "Scheduled Event":
        return TICK
    return None
