"""Pushing round notices to devices through AWS IoT Core's data plane (torch-free: the
initiator's zip carries it).

A notice only saves devices a wait: a failed publish is logged and the round goes on, since
every device still polls, slowly, as the fallback. The data endpoint is the account's own ATS
endpoint (``iot:DescribeEndpoint``, ``endpointType=iot:Data-ATS``), looked up once per
container; where the process is pointed at another endpoint (``AWS_ENDPOINT_URL``: an
emulator that serves every service at one address) the lookup is made all the same and the
publish goes to that endpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache
from typing import Any

from sfl.core.notices import NOTICE_TOPIC_ENV, RoundNotice
from sfl.state.rounds import Round

logger = logging.getLogger(__name__)

#: Publishes one notice to the deployment's notice topic (raising when it could not).
NoticePublisher = Callable[[RoundNotice], None]
#: The ATS data endpoint (AWS IoT Core's recommended one) of the account.
DATA_ENDPOINT_TYPE = "iot:Data-ATS"
#: At least once: a device that is connected gets it even if a packet is lost on the way.
NOTICE_QOS = 1


class IotCoreNotices:
    """Publishes notices to ``topic`` through IoT Core's data plane (``iot-data`` Publish)."""

    def __init__(self, topic: str, *, session: Any = None) -> None:
        self.topic = topic
        self._session = session
        self._client: Any = None

    def _data_plane(self) -> Any:
        if self._client is None:
            import boto3

            session = self._session or boto3.session.Session()
            found = session.client("iot").describe_endpoint(endpointType=DATA_ENDPOINT_TYPE)
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or f"https://{found['endpointAddress']}"
            self._client = session.client("iot-data", endpoint_url=endpoint)
        return self._client

    def __call__(self, notice: RoundNotice) -> None:
        self._data_plane().publish(topic=self.topic, qos=NOTICE_QOS, payload=notice.encode())


# What decides where and as whom a publisher publishes (a new endpoint: a new publisher).
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@cache
def _iot_core_notices(topic: str, env: tuple[str, ...]) -> IotCoreNotices:
    del env  # part of the cache's key only
    return IotCoreNotices(topic)


def deployed_notice_publisher() -> NoticePublisher | None:
    """The publisher for the topic the stack named (``SFL_NOTICE_TOPIC``), made once per
    container; None when the stack named none (push off: devices poll)."""
    topic = os.environ.get(NOTICE_TOPIC_ENV)
    if not topic:
        return None
    return _iot_core_notices(topic, tuple(os.environ.get(k, "") for k in _ENV_KEYS))


def announce_round(publish: NoticePublisher | None, round_: Round) -> bool:
    """Tell subscribed devices that ``round_`` opened (after its assignment was written);
    whether the notice went out. Never raises: a failed publish costs devices a wait, not
    the round."""
    if publish is None:
        return False
    notice = RoundNotice(round_.experiment, round_.round, round_.base_version)
    try:
        publish(notice)
    except Exception as e:  # any failure of the push: the devices' polling is the fallback
        logger.warning(
            "round notice not published (devices find round %d by polling): %s: %s",
            round_.round,
            type(e).__name__,
            e,
            extra={"round": round_.round, "error": f"{type(e).__name__}: {e}"},
        )
        return False
    return True
