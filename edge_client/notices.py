"""Round notices on the device: a subscription that wakes the client to poll now.

The transport is the only part that differs between a device and local mode. Under the
Greengrass nucleus the subscription goes through IPC (``aws.greengrass.ipc.mqttproxy``: the
nucleus's own MQTT connection to IoT Core, allowed by the recipe's access control and the
device's IoT policy); local mode hands in a subscription to its MQTT broker. What a notice
does is the same everywhere: it ends the client's pause, and the poll that follows reads the
assignment, which alone decides what the client does. A notice is a hint, never an
instruction: one that does not read as a notice wakes nobody, and however many arrive, the
client polls at most once per ``MIN_WAKE_INTERVAL_SECONDS`` because of them.

While the subscription is live the client polls only every ``push_poll_seconds`` (a missed
notice costs at most that wait); when it fails or ends, the client polls every
``poll_seconds`` again and tries to subscribe anew every ``push_poll_seconds``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

from sfl.core.notices import NoticeUnreadable, RoundNotice

logger = logging.getLogger(__name__)

#: Opens a subscription to ``topic``: calls ``on_message(payload)`` for each message and
#: ``on_lost(reason)`` when the subscription ends; returns what closes it. Raises when the
#: subscription cannot be made.
Subscribe = Callable[[str, Callable[[bytes], None], Callable[[str], None]], Callable[[], None]]

#: What the nucleus sets for each component process it runs: the IPC socket and the
#: component's token (Greengrass's "Use the AWS IoT Device SDK to communicate with the
#: Greengrass nucleus"; the IPC client reads both).
NUCLEUS_VARIABLES = ("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "SVCUID")
#: However many notices arrive, they wake the client at most this often.
MIN_WAKE_INTERVAL_SECONDS = 1.0
_WAIT_SLICE_SECONDS = 0.5  # how soon a pause notices a stop


def under_nucleus(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs as a Greengrass component (so IPC is there to use)."""
    env = os.environ if env is None else env
    return all(env.get(name) for name in NUCLEUS_VARIABLES)


def greengrass_ipc_subscribe(
    topic: str, on_message: Callable[[bytes], None], on_lost: Callable[[str], None]
) -> Callable[[], None]:
    """Subscribe to ``topic`` on IoT Core through the nucleus (IPC ``SubscribeToIoTCore``,
    QoS 1). The SDK is imported here, so a client that never subscribes never loads it."""
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    from awsiot.greengrasscoreipc.model import QOS, IoTCoreMessage

    client = GreengrassCoreIPCClientV2()

    def on_event(event: IoTCoreMessage) -> None:
        message = event.message
        on_message(bytes(message.payload or b"") if message is not None else b"")

    def on_error(error: Exception) -> bool:
        on_lost(f"{type(error).__name__}: {error}")
        return True  # close the stream: the client polls, and subscribes anew later

    def on_closed() -> None:
        on_lost("the nucleus closed the subscription")

    try:
        _, operation = client.subscribe_to_iot_core(
            topic_name=topic,
            qos=QOS.AT_LEAST_ONCE,
            on_stream_event=on_event,
            on_stream_error=on_error,
            on_stream_closed=on_closed,
        )
    except BaseException:
        client.close()
        raise

    def close() -> None:
        try:
            operation.close()
        finally:
            client.close()

    return close


class RoundNotices:
    """This client's subscription to round notices, and the wake-ups it gives the loop."""

    def __init__(
        self,
        topic: str,
        subscribe: Subscribe,
        *,
        retry_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topic = topic
        self.retry_seconds = retry_seconds
        self.heard = 0  # notices that woke (or would have woken) the client
        self.ignored = 0  # messages on the topic that were not notices
        self._subscribe = subscribe
        self._clock = clock
        self._lock = threading.Lock()
        self._woken = threading.Event()
        self._close: Callable[[], None] | None = None
        self._generation = 0  # a lost subscription only ends the one it belongs to
        self._next_attempt = 0.0
        self._last_wake = -MIN_WAKE_INTERVAL_SECONDS

    @property
    def live(self) -> bool:
        """Whether a subscription is open (then the client polls only as a fallback)."""
        return self._close is not None

    def connect(self) -> bool:
        """Subscribe if not subscribed and an attempt is due; whether the subscription is
        live. A failure is logged and retried after ``retry_seconds``, never raised."""
        if self.live or self._clock() < self._next_attempt:
            return self.live
        self._next_attempt = self._clock() + self.retry_seconds
        with self._lock:
            self._generation += 1
            generation = self._generation
        try:
            close = self._subscribe(
                self.topic, self._on_message, lambda reason: self._on_lost(generation, reason)
            )
        except Exception as e:  # no nucleus, not authorised, no broker: poll instead
            logger.warning(
                "round notices unavailable (%s: %s); polling every poll_seconds",
                type(e).__name__,
                e,
                extra={"topic": self.topic, "error": f"{type(e).__name__}: {e}"},
            )
            return False
        with self._lock:
            if generation == self._generation:
                self._close = close
        logger.info("subscribed to round notices", extra={"topic": self.topic})
        return self.live

    def _on_message(self, payload: bytes) -> None:
        try:
            notice = RoundNotice.decode(payload)
        except NoticeUnreadable as e:
            self.ignored += 1
            logger.warning("message on the notice topic ignored: %s", e, extra={"error": str(e)})
            return
        self.heard += 1
        logger.info("round notice", extra={"round": notice.round, "experiment": notice.experiment})
        self._woken.set()

    def _on_lost(self, generation: int, reason: str) -> None:
        with self._lock:
            if generation != self._generation or self._close is None:
                return
            self._close = None
        logger.warning(
            "round notices lost (%s); polling every poll_seconds", reason, extra={"error": reason}
        )
        self._woken.set()  # the pause ends: the client goes back to polling at once

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        """Pause up to ``seconds``: until a notice (True), the subscription's loss or a stop."""
        deadline = self._clock() + seconds
        while not stop.is_set():
            left = deadline - self._clock()
            if left <= 0:
                return False
            if self._woken.wait(min(left, _WAIT_SLICE_SECONDS)):
                self._woken.clear()
                if not self.live:
                    return False
                # A burst of notices wakes the client once per interval, never more.
                stop.wait(max(0.0, self._last_wake + MIN_WAKE_INTERVAL_SECONDS - self._clock()))
                self._last_wake = self._clock()
                self._woken.clear()
                return True
        return False

    def close(self) -> None:
        with self._lock:
            close, self._close = self._close, None
            self._generation += 1
        if close is not None:
            try:
                close()
            except Exception as e:  # stopping anyway
                logger.info("closing the notice subscription: %s: %s", type(e).__name__, e)
