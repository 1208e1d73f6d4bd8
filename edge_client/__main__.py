"""``python -m edge_client``: run the client until SIGTERM/SIGINT, then exit cleanly."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType


def main(argv: Sequence[str] | None = None) -> int:
    from edge_client.client import EdgeClient
    from edge_client.settings import parse_settings
    from sfl.aws import make_clients
    from sfl.tasks import load_task

    settings = parse_settings(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [{settings.client_id}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("edge_client").info("signal %s received; stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    aws = make_clients(endpoint_url=settings.endpoint_url, region=settings.region)
    client = EdgeClient(settings, aws, load_task(settings.task), stop=stop)
    return client.run()


if __name__ == "__main__":
    sys.exit(main())
