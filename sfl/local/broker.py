"""IoT Core's MQTT side for local mode: a real MQTT broker (amqtt) on this machine.

The initiator's notices reach it as IoT Core's data-plane publishes reach IoT Core: not
through an MQTT connection of the publisher's own, but handed to the broker, which delivers
them to every subscriber of the topic at QoS 1. Simulated devices subscribe with a real MQTT
client; their ``edge_client.notices.RoundNotices`` is the device's own code, only the
transport (``subscribe``) differs from a Greengrass device's IPC.

The broker and every local subscription share one event loop, run by a thread of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from sfl.core.notices import RoundNotice

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_START_SECONDS = 10.0
_CALL_SECONDS = 10.0
QOS_AT_LEAST_ONCE = 1
_SUBACK_FAILURE = 0x80


class BrokerError(RuntimeError):
    """The local broker refused or failed a request (a subscription, a publish)."""


async def _cancel_the_rest() -> None:
    """End every task still on the loop (a subscription's delivery, the broker's own)."""
    current = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalIotCore:
    """An MQTT broker on 127.0.0.1 for as long as the ``with`` block runs."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="local-iot-core", daemon=True
        )
        self._broker: Any = None
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}/"

    def __enter__(self) -> LocalIotCore:
        from amqtt.broker import Broker

        self.port = _free_port()
        self._thread.start()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._broker = Broker(config, loop=self._loop)
        self._run(self._broker.start(), _START_SECONDS)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        if self._broker is not None:
            try:
                self._run(self._shutdown(), _CALL_SECONDS)
            except Exception as e:  # stopping anyway
                logger.info("local broker shutdown: %s: %s", type(e).__name__, e)
        if self._thread.is_alive():
            self._run(_cancel_the_rest(), _CALL_SECONDS)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=_CALL_SECONDS)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        # amqtt waits 5 s for its broadcast loop to notice the shutdown; ending it first is
        # what the wait would end in anyway, without the wait.
        broadcast = getattr(self._broker, "_broadcast_task", None)
        if broadcast is not None:
            broadcast.cancel()
        quiet = logging.getLogger("amqtt")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            await self._broker.shutdown()
        finally:
            quiet.setLevel(level)

    def _run(self, work: Coroutine[Any, Any, _T], timeout: float) -> _T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    # -- the initiator's side ----------------------------------------------------------------

    def publisher(self, topic: str) -> Callable[[RoundNotice], None]:
        """What the initiator publishes notices with locally (IoT Core's data plane's part)."""

        def publish(notice: RoundNotice) -> None:
            self._run(
                self._broker.internal_message_broadcast(
                    topic, notice.encode(), qos=QOS_AT_LEAST_ONCE
                ),
                _CALL_SECONDS,
            )

        return publish

    # -- the devices' side -------------------------------------------------------------------

    def subscribe(
        self, topic: str, on_message: Callable[[bytes], None], on_lost: Callable[[str], None]
    ) -> Callable[[], None]:
        """A device's subscription (``edge_client.notices.Subscribe``) over its own MQTT
        connection to the broker, at QoS 1."""
        from amqtt.client import MQTTClient

        client = MQTTClient(
            client_id=f"sfl-local-{next(self._ids)}", config={"auto_reconnect": False}
        )

        async def open_subscription() -> None:
            await client.connect(self.url)
            codes = await client.subscribe([(topic, QOS_AT_LEAST_ONCE)])
            if any(code == _SUBACK_FAILURE for code in codes):
                await client.disconnect()
                raise BrokerError(f"the broker refused the subscription to {topic}")

        async def deliver() -> None:
            try:
                while True:
                    message = await client.deliver_message()
                    if message is None:
                        raise BrokerError("the connection ended")
                    on_message(bytes(message.data or b""))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the connection is gone: the device polls again
                on_lost(f"{type(e).__name__}: {e}")

        self._run(open_subscription(), _CALL_SECONDS)
        delivery = asyncio.run_coroutine_threadsafe(deliver(), self._loop)

        def close() -> None:
            delivery.cancel()
            try:
                self._run(client.disconnect(), _CALL_SECONDS)
            except Exception as e:  # the broker may be gone already
                logger.debug("local subscription close: %s: %s", type(e).__name__, e)

        return close
