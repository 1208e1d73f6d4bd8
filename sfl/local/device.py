"""A simulated device's life: an ``EdgeClient`` restarted like a Greengrass component.

``sfl simulate`` runs it in threads of its own process or in worker processes (``workers``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError

from edge_client.client import EdgeClient
from edge_client.settings import ClientSettings
from sfl.learning.tasks.base import TrainingTask
from sfl.local.faults import SimulatedCrash
from sfl.state.aws import AwsClients

logger = logging.getLogger(__name__)


def run_client(
    settings: ClientSettings,
    make_clients: Callable[[], AwsClients],
    task: TrainingTask,
    stop: threading.Event,
    hooks: Any,
    restart_after: float,
    wake: Callable[[float], None] | None,
) -> None:
    """One device: an EdgeClient that, when it crashes, is restarted like a Greengrass
    component, having lost the round it was working on. Creating its AWS clients fetches
    credentials; if the credentials endpoint does not answer in time (a loaded machine),
    the component starts again, as Greengrass restarts one that exited."""
    resume_after_round = 0
    while not stop.is_set():
        try:
            aws_clients = make_clients()
        except BotoCoreError as error:
            logger.warning("%s: no AWS clients (%s); restarting", settings.client_id, error)
            stop.wait(1.0)
            continue
        client = EdgeClient(settings, aws_clients, task, stop=stop, hooks=hooks, wake=wake)
        client._last_round_seen = resume_after_round
        try:
            client.run()
            return
        except SimulatedCrash:
            resume_after_round = client._last_round_seen
            stop.wait(min(restart_after, 2.0))
