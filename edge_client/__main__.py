"""``python -m edge_client``: run the client until SIGTERM/SIGINT, then exit cleanly.

Greengrass stops a component with SIGTERM and kills it 5 s later (the nucleus's
``UnixExec.close``), so the client works in a thread and the main thread only waits: after a
stop it gives the work ``STOP_GRACE_SECONDS`` to end at a safe point, then exits 0 whatever
the work is blocked on (a half-trained update is never uploaded either way).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_client.settings import ClientSettings
    from sfl.state.aws import AwsClients

logger = logging.getLogger("edge_client")

STOP_GRACE_SECONDS = 3.0  # inside the nucleus's 5 s, with room to exit
CONNECT_FIRST_BACKOFF_SECONDS = 1.0


def connect(settings: ClientSettings, stop: threading.Event) -> AwsClients | None:
    """AWS clients, waiting with back-off while credentials or the network are not there yet.

    On a core device the token exchange service may start after the component, restart, or
    be unable to reach AWS IoT; none of that is a reason to fail (three failed starts make
    the component BROKEN). Returns None when stopped first.
    """
    from botocore.exceptions import BotoCoreError

    from sfl.state.aws import EDGE_CONFIG, make_clients

    backoff = CONNECT_FIRST_BACKOFF_SECONDS
    while not stop.is_set():
        try:
            return make_clients(
                endpoint_url=settings.endpoint_url, region=settings.region, config=EDGE_CONFIG
            )
        except BotoCoreError as e:
            logger.warning(
                "AWS credentials unavailable (token exchange service): %s: %s; retrying in %.1f s",
                type(e).__name__,
                e,
                backoff,
                extra={"error_code": type(e).__name__, "error": str(e), "backoff_s": backoff},
            )
            stop.wait(backoff)
            backoff = min(backoff * 2, settings.max_backoff_seconds)
    return None


def run_client(settings: ClientSettings, stop: threading.Event) -> int:
    from edge_client.client import EdgeClient
    from edge_client.notices import RoundNotices, greengrass_ipc_subscribe, under_nucleus
    from sfl.learning.tasks import load_task

    task = load_task(settings.task, settings.task_params)
    aws = connect(settings, stop)
    if aws is None:
        logger.info("client stopped", extra={"client_id": settings.client_id})
        return 0
    # Round notices through the nucleus when the stack named a topic and this runs as a
    # Greengrass component; elsewhere (python -m edge_client on any machine) it polls.
    notices = (
        RoundNotices(
            settings.notice_topic,
            greengrass_ipc_subscribe,
            retry_seconds=settings.push_poll_seconds,
        )
        if settings.notice_topic and under_nucleus()
        else None
    )
    return EdgeClient(settings, aws, task, stop=stop, notices=notices).run()


def main(argv: Sequence[str] | None = None) -> int:
    from edge_client.settings import parse_settings

    settings = parse_settings(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [{settings.client_id}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # botocore logs each failed credential refresh with a traceback; the client's own line
    # ("AWS call failed: ... CredentialRetrievalError") already says it, once per attempt.
    logging.getLogger("botocore.credentials").setLevel(logging.ERROR)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %s received; stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    outcome: list[int] = []

    def work() -> None:
        try:
            outcome.append(run_client(settings, stop))
        except Exception:
            logger.exception("client failed")
            outcome.append(1)

    worker = threading.Thread(target=work, name="edge-client", daemon=True)
    worker.start()
    while worker.is_alive() and not stop.is_set():
        worker.join(0.5)
    worker.join(STOP_GRACE_SECONDS)
    if worker.is_alive():
        logger.warning(
            "client stopped without waiting for the current step (still busy %.0f s after the "
            "stop); nothing half-done was uploaded",
            STOP_GRACE_SECONDS,
        )
        logging.shutdown()
        os._exit(0)  # the worker may sit in a socket call; the nucleus kills at 5 s anyway
    code = outcome[0] if outcome else 1
    if stop.is_set():
        # Stopped: nothing is left to do, and tearing the interpreter down (torch's and the
        # thread pools' exit hooks) can take seconds of the nucleus's 5 on a busy board.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
