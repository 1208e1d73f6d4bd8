"""Round notices (push): the notice's shape, the initiator's publish, and the device's
subscription, whose notices only wake the client to poll (the assignment stays the authority).

The device's transport is faked only at its boundary: ``Subscribe`` (what a Greengrass IPC
subscription or local mode's MQTT client gives ``RoundNotices``), and, for the IPC transport
itself, the documented ``GreengrassCoreIPCClientV2.subscribe_to_iot_core`` interface.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client.client import EdgeClient
from edge_client.notices import RoundNotices, greengrass_ipc_subscribe, under_nucleus
from edge_client.settings import parse_settings
from sfl.core import layout
from sfl.core.notices import MAX_NOTICE_BYTES, NoticeUnreadable, RoundNotice, notice_topic
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.local.federation import LocalFederation
from sfl.server.averager import bootstrap_model
from sfl.server.initiator import start_round
from sfl.state.registry import ClientRegistry
from tests.conftest import Stack

# --- the notice -----------------------------------------------------------------------------


def test_a_notice_is_small_and_names_no_client() -> None:
    notice = RoundNotice("default", 12, 11)
    body = notice.encode()
    assert RoundNotice.decode(body) == notice
    assert json.loads(body) == {
        "experiment": "default",
        "round": 12,
        "base_version": 11,
        "assignment_key": layout.ASSIGNMENT_KEY,
    }
    assert len(body) < 200


def test_the_topic_is_one_per_stack_and_experiment_and_never_a_wildcard() -> None:
    assert notice_topic("Sfl-Prod", "mnist") == "sfl/Sfl-Prod/mnist/rounds"
    assert notice_topic("A", "default") != notice_topic("B", "default")
    for deployment, experiment in (("a/b", "x"), ("+", "x"), ("a", "#"), ("$aws", "x"), ("", "x")):
        with pytest.raises(ValueError, match="cannot be a topic level"):
            notice_topic(deployment, experiment)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"null",
        b"[]",
        b'{"round": 1}',
        b'{"experiment":"x","round":true,"base_version":0,"assignment_key":"rounds/current.json"}',
        b'{"experiment":"x","round":1,"base_version":0,"assignment_key":"../../etc"}',
        b'{"experiment":"x","round":NaN,"base_version":0,"assignment_key":"rounds/current.json"}',
        b'{"experiment":"x/y","round":1,"base_version":0,"assignment_key":"rounds/current.json"}',
        b'{"experiment":"x","round":1,"base_version":0,"assignment_key":"rounds/current.json",'
        b'"selected":["a"]}',
        b"\xff\xfe",
        b"[" * 100_000,
        b" " * (MAX_NOTICE_BYTES + 1),
    ],
)
def test_what_is_not_a_notice_is_refused_with_a_reason(payload: bytes) -> None:
    with pytest.raises(NoticeUnreadable):
        RoundNotice.decode(payload)


@given(st.binary(max_size=2 * MAX_NOTICE_BYTES))
def test_any_bytes_read_as_a_notice_or_refused(payload: bytes) -> None:
    try:
        notice = RoundNotice.decode(payload)
    except NoticeUnreadable:
        return
    assert RoundNotice.decode(notice.encode()) == notice


# --- the initiator publishes once the assignment is written ----------------------------------


def _active(stack: Stack, *clients: str) -> None:
    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
    for client in clients:
        registry.heartbeat(client, now=time.time(), active_window_seconds=3_600)


def test_the_initiator_pushes_a_notice_after_writing_the_assignment(stack: Stack) -> None:
    stack.put_model(0, {"w": __import__("torch").zeros(2)})
    _active(stack, "c1", "c2")
    published: list[tuple[RoundNotice, bytes]] = []

    def publish(notice: RoundNotice) -> None:
        assignment = stack.clients.s3.get_object(
            Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY
        )["Body"].read()
        published.append((notice, assignment))

    started = start_round(stack.clients, stack.names, stack.config, notices=publish)

    assert started.started
    ((notice, assignment),) = published
    assert notice == RoundNotice(stack.config.experiment, started.round or 0, 0)
    assert json.loads(assignment)["round"] == notice.round  # written before the notice
    assert b"c1" not in notice.encode() and b"c2" not in notice.encode()


def test_a_failed_publish_is_logged_and_the_round_opens_anyway(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stack.put_model(0, {"w": __import__("torch").zeros(2)})
    _active(stack, "c1")

    def broken(notice: RoundNotice) -> None:
        raise ConnectionError("IoT Core unreachable")

    started = start_round(stack.clients, stack.names, stack.config, notices=broken)

    assert started.started and started.round == 1
    assert stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY)
    assert "round notice not published" in caplog.text and "IoT Core unreachable" in caplog.text


# --- the device's subscription ---------------------------------------------------------------


@dataclasses.dataclass
class FakeTransport:
    """The transport boundary (``edge_client.notices.Subscribe``): records the subscription's
    callbacks so the test can deliver messages or end it, as a broker or the nucleus would."""

    fail: Exception | None = None
    topics: list[str] = dataclasses.field(default_factory=list)
    on_message: Callable[[bytes], None] | None = None
    on_lost: Callable[[str], None] | None = None
    closed: int = 0

    def __call__(
        self, topic: str, on_message: Callable[[bytes], None], on_lost: Callable[[str], None]
    ) -> Callable[[], None]:
        self.topics.append(topic)
        if self.fail is not None:
            raise self.fail
        self.on_message, self.on_lost = on_message, on_lost

        def close() -> None:
            self.closed += 1

        return close


def test_only_a_notice_wakes_the_client_and_a_burst_wakes_it_once() -> None:
    transport = FakeTransport()
    notices = RoundNotices("sfl/s/default/rounds", transport, retry_seconds=60)
    assert notices.connect() and transport.topics == ["sfl/s/default/rounds"]
    assert transport.on_message is not None
    stop = threading.Event()

    transport.on_message(b"wake up, all of you")
    assert not notices.wait(0.2, stop) and notices.ignored == 1

    for number in range(1, 101):
        transport.on_message(RoundNotice("default", number, 0).encode())
    assert notices.wait(5, stop) and notices.heard == 100
    assert not notices.wait(0.2, stop)  # the burst was one wake-up


def test_a_lost_subscription_ends_the_pause_and_is_retried_only_when_due() -> None:
    transport = FakeTransport()
    now = [0.0]
    notices = RoundNotices("t", transport, retry_seconds=300, clock=lambda: now[0])
    assert notices.connect()
    assert transport.on_lost is not None
    transport.on_lost("the nucleus closed the subscription")
    assert not notices.live
    assert not notices.wait(10, threading.Event())  # returns at once: poll now
    assert not notices.connect() and len(transport.topics) == 1  # not yet due
    now[0] = 300.0
    assert notices.connect() and len(transport.topics) == 2


def test_a_subscription_that_cannot_be_made_leaves_the_client_polling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = FakeTransport(fail=PermissionError("Not Authorized"))
    notices = RoundNotices("t", transport, retry_seconds=60)
    assert not notices.connect() and not notices.live
    assert "round notices unavailable" in caplog.text and "Not Authorized" in caplog.text


def test_the_nucleus_is_recognised_by_the_variables_it_sets() -> None:
    assert under_nucleus(
        {"AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": "/gg/ipc.socket", "SVCUID": "x"}
    )
    assert not under_nucleus({"SVCUID": "x"})
    assert not under_nucleus({})


def _client(stack: Stack, tmp_path: Path, transport: FakeTransport, **env: str) -> EdgeClient:
    task = load_task("digits")
    write_client_splits(task, tmp_path, 1, "iid", seed=0, client_ids=["c1"])
    settings = parse_settings(
        [],
        {
            **stack.aws.env(),
            "SFL_CLIENT_ID": "c1",
            "SFL_MODELS_BUCKET": stack.names.models_bucket,
            "SFL_UPDATES_BUCKET": stack.names.updates_bucket,
            "SFL_CLIENTS_TABLE": stack.names.clients_table,
            "SFL_DATA_DIR": str(tmp_path / "c1"),
            "SFL_NOTICE_TOPIC": "sfl/s/default/rounds",
            **env,
        },
    )
    settings = dataclasses.replace(settings, max_rounds=1)
    notices = RoundNotices(settings.notice_topic, transport, retry_seconds=3_600)
    client = EdgeClient(settings, stack.clients, task, notices=notices)
    bootstrap_model(stack.clients, stack.names, task.build_model(seed=0).state_dict(), seed=0)
    return client


def _run(client: EdgeClient) -> threading.Thread:
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    return thread


def _heartbeated(client: EdgeClient) -> None:
    deadline = time.time() + 30
    registry = ClientRegistry(client.aws.dynamodb, client.settings.clients_table)
    while registry.get(client.settings.client_id) is None:
        assert time.time() < deadline, "the client never heartbeated"
        time.sleep(0.05)


def test_while_subscribed_the_client_polls_only_when_a_notice_comes(
    stack: Stack, tmp_path: Path
) -> None:
    """Polling every hour (the fallback): the round is found within the test's time only
    because the notice woke the client."""
    transport = FakeTransport()
    client = _client(
        stack, tmp_path, transport, SFL_POLL_SECONDS="3600", SFL_PUSH_POLL_SECONDS="3600"
    )
    thread = _run(client)
    try:
        _heartbeated(client)
        started = start_round(stack.clients, stack.names, stack.config)
        assert started.started
        assert transport.on_message is not None
        transport.on_message(RoundNotice(stack.config.experiment, 1, 0).encode())
        thread.join(timeout=120)
        assert not thread.is_alive() and client.rounds_answered == 1
        assert client.settings.push_heartbeat_seconds > client.settings.heartbeat_seconds
    finally:
        client.stop.set()
        thread.join(timeout=10)
    assert transport.closed == 1  # the subscription ends with the client


def test_when_the_subscription_is_lost_the_client_polls_at_poll_seconds_again(
    stack: Stack, tmp_path: Path
) -> None:
    transport = FakeTransport()
    client = _client(
        stack, tmp_path, transport, SFL_POLL_SECONDS="0.2", SFL_PUSH_POLL_SECONDS="3600"
    )
    thread = _run(client)
    try:
        _heartbeated(client)
        assert transport.on_lost is not None
        transport.on_lost("stream closed")
        started = start_round(stack.clients, stack.names, stack.config)
        assert started.started  # no notice: only polling finds it
        thread.join(timeout=120)
        assert not thread.is_alive() and client.rounds_answered == 1
    finally:
        client.stop.set()
        thread.join(timeout=10)


# --- the device's transport: Greengrass IPC --------------------------------------------------


class FakeIpcClient:
    """``GreengrassCoreIPCClientV2`` as its documentation describes it: subscribe_to_iot_core
    with keyword arguments returns (response, operation); operation.close(); client.close()."""

    made: list[FakeIpcClient] = []

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.closed = False
        self.operation_closed = False
        FakeIpcClient.made.append(self)

    def subscribe_to_iot_core(self, **request: Any) -> tuple[object, Any]:
        self.requests.append(request)
        client = self

        class Operation:
            def close(self) -> None:
                client.operation_closed = True

        return object(), Operation()

    def close(self) -> None:
        self.closed = True


def test_the_ipc_transport_subscribes_at_qos_1_and_hands_payloads_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("awsiot")
    from awsiot.greengrasscoreipc import clientv2
    from awsiot.greengrasscoreipc.model import QOS, IoTCoreMessage, MQTTMessage

    monkeypatch.setattr(clientv2, "GreengrassCoreIPCClientV2", FakeIpcClient)
    FakeIpcClient.made.clear()
    heard: list[bytes] = []
    lost: list[str] = []

    close = greengrass_ipc_subscribe("sfl/s/default/rounds", heard.append, lost.append)

    ((client,),) = [FakeIpcClient.made]
    ((request,),) = [client.requests]
    assert request["topic_name"] == "sfl/s/default/rounds" and request["qos"] == QOS.AT_LEAST_ONCE
    request["on_stream_event"](
        IoTCoreMessage(message=MQTTMessage(topic_name="sfl/s/default/rounds", payload=b"{}"))
    )
    assert heard == [b"{}"]
    assert request["on_stream_error"](RuntimeError("connection reset")) is True
    request["on_stream_closed"]()
    assert lost == ["RuntimeError: connection reset", "the nucleus closed the subscription"]
    close()
    assert client.operation_closed and client.closed


# --- local mode: the same device code over a real MQTT broker ---------------------------------


def test_a_local_fleet_client_finds_its_round_by_the_pushed_notice(
    federation: LocalFederation, tmp_path: Path
) -> None:
    task = load_task(federation.config.task)
    write_client_splits(task, tmp_path, 1, "iid", seed=0, client_ids=["c1"])
    settings = dataclasses.replace(
        federation.client_settings("c1", data_dir=tmp_path / "c1", poll_seconds=3_600),
        push_poll_seconds=3_600,
        max_rounds=1,
    )
    client = EdgeClient(
        settings, federation.aws.clients(), task, notices=federation.round_notices(settings)
    )
    thread = _run(client)
    try:
        _heartbeated(client)
        assert client.notices is not None and client.notices.live
        assert federation.start_round()["started"]
        thread.join(timeout=120)
        assert not thread.is_alive() and client.rounds_answered == 1
        assert client.notices.heard == 1
    finally:
        client.stop.set()
        thread.join(timeout=10)
