"""Delivers S3 events from the emulator's queue to the averager handler, as Lambda would.

At least once and concurrently: a message is deleted only after the handler returns; if it
raises, the message becomes visible again and is redelivered. ``extra_deliveries`` repeats
each event to exercise idempotency; ``drop_rate`` loses a share of events for good, as S3
very rarely does (the averager's tick finds those updates by listing).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)


class S3EventDispatcher:
    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        invoke: Callable[[dict[str, Any]], Any],
        *,
        concurrency: int = 4,
        extra_deliveries: int = 0,
        drop_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop rate {drop_rate} is not in [0, 1]")
        self._sqs = sqs
        self._queue_url = queue_url
        self._invoke = invoke
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="averager")
        self._extra = extra_deliveries
        self._drop_rate = drop_rate
        self._rng = random.Random(seed)
        self.dropped: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="s3-dispatcher", daemon=True)
        self._lock = threading.Lock()
        # Like Lambda's SQS poller, take no more messages than there are free invocations:
        # a message waiting in a local backlog would outlive its visibility timeout and be
        # delivered again while the first copy still waits.
        self._slots = threading.BoundedSemaphore(concurrency)
        self._concurrency = concurrency
        self.invocations = 0
        self.failures = 0

    def start(self) -> S3EventDispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=0.5):
                continue
            free = 1
            while free < min(10, self._concurrency) and self._slots.acquire(blocking=False):
                free += 1
            try:
                messages = self._sqs.receive_message(
                    QueueUrl=self._queue_url, MaxNumberOfMessages=free, WaitTimeSeconds=1
                ).get("Messages", [])
            except Exception:
                self._release(free)
                if self._stop.is_set():
                    return
                logger.exception("receiving S3 events failed")
                self._stop.wait(0.5)
                continue
            if not messages:
                self._stop.wait(0.05)
            self._release(free - len(messages))
            for message in messages:
                event = json.loads(message["Body"])
                if "Records" not in event:  # s3:TestEvent when the notification is configured
                    self._delete(message)
                    self._release(1)
                    continue
                if self._drop_rate and self._rng.random() < self._drop_rate:
                    self.dropped.extend(r["s3"]["object"]["key"] for r in event["Records"])
                    self._delete(message)
                    self._release(1)
                    continue
                self._pool.submit(self._deliver, event, message)
                for _ in range(self._extra):
                    self._pool.submit(self._deliver, event, None)

    def _release(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    def _deliver(self, event: dict[str, Any], message: dict[str, Any] | None) -> None:
        with self._lock:
            self.invocations += 1
        try:
            self._invoke(event)
        except Exception:
            with self._lock:
                self.failures += 1
            logger.exception("averager invocation failed; the event will be redelivered")
            return
        finally:
            if message is not None:  # the extra deliveries hold no slot
                self._release(1)
        if message is not None:
            self._delete(message)

    def _delete(self, message: dict[str, Any]) -> None:
        try:
            self._sqs.delete_message(
                QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"]
            )
        except Exception:
            logger.exception("deleting a delivered S3 event failed")
