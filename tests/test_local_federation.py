"""One local federation: the endpoint, the stack's resources, both handlers, the S3-event
delivery and model version 0, as ``sfl simulate``, ``sfl loadtest`` and ``sfl local up`` run it."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from edge_client.client import EdgeClient
from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.learning import codec
from sfl.learning.tasks import load_task
from sfl.local.federation import LocalFederation
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import RoundState


def _trained(federation: LocalFederation) -> dict[str, torch.Tensor]:
    """Version 0 moved a little, as a client's training would (an unchanged model is refused)."""
    body = federation.clients.s3.get_object(
        Bucket=federation.names.models_bucket, Key=layout.model_key(0)
    )["Body"].read()
    return {
        name: t + 0.01 if t.is_floating_point() else t for name, t in codec.decode(body).items()
    }


def test_a_client_upload_reaches_the_averager_and_closes_the_round_on_a_new_version(
    federation: LocalFederation,
) -> None:
    settings = federation.client_settings("c1", data_dir=Path("."))
    assert (settings.models_bucket, settings.updates_bucket, settings.clients_table) == (
        federation.names.models_bucket,
        federation.names.updates_bucket,
        federation.names.clients_table,
    )
    client = EdgeClient(settings, federation.aws.clients(), load_task(federation.config.task))
    client.heartbeat()

    started = federation.start_round()
    assert started["started"] and started["round"] == 1
    assignment = client.assignment_to_answer()
    assert assignment is not None and assignment.base_version == 0
    metadata = codec.UpdateMetadata(
        round=1, client_id="c1", base_version=0, num_examples=10, metrics={"loss": 1.0}
    )
    client.upload(assignment, codec.encode(_trained(federation), metadata.to_header()), time.time())
    waited = federation.wait_for_round(1, timeout=60)

    assert waited.finished and waited.status == "CLOSED" and waited.left_open_at is not None
    record = federation.rounds.get(federation.config.experiment, 1)
    assert record is not None and record.status is RoundState.CLOSED
    assert list(record.accepted) == ["c1"] and record.model_version == 1
    federation.clients.s3.head_object(
        Bucket=federation.names.models_bucket, Key=layout.model_key(1)
    )
    assert federation.dispatcher.invocations >= 1 and federation.dispatcher.failures == 0
    # The invocation that closed the round deleted its update (sfl.server.update_disposal):
    # once every delivery has returned, the bucket holds none of round 1's.
    federation.dispatcher.stop()
    listed = federation.clients.s3.list_objects_v2(
        Bucket=federation.names.updates_bucket, Prefix=layout.update_key("c1", 1)
    )
    assert listed.get("KeyCount", 0) == 0


def test_a_round_that_gets_no_answer_is_still_waiting_when_the_wait_ends(
    federation: LocalFederation,
) -> None:
    ClientRegistry(federation.clients.dynamodb, federation.names.clients_table).heartbeat(
        "silent", now=time.time(), active_window_seconds=federation.config.active_window_seconds
    )
    assert federation.start_round()["started"]

    waited = federation.wait_for_round(1, timeout=0.5)

    assert not waited.finished and waited.status == "OPEN" and waited.left_open_at is None


def test_its_schedule_starts_rounds_and_leaving_stops_its_own_endpoint(tmp_path: Path) -> None:
    before = os.environ.get("AWS_ENDPOINT_URL")
    config = FederationConfig(experiment="scheduled", selection="all")
    with LocalFederation(
        config, tick_seconds=0.1, log_path=tmp_path / "lambda-logs.jsonl"
    ) as federation:
        endpoint = federation.endpoint_url
        assert os.environ["AWS_ENDPOINT_URL"] == endpoint  # the handlers' environment
        ClientRegistry(federation.clients.dynamodb, federation.names.clients_table).heartbeat(
            "c1", now=time.time(), active_window_seconds=config.active_window_seconds
        )
        federation.start_schedule(round_seconds=0.2)
        deadline = time.time() + 30
        while federation.rounds.get(config.experiment, 1) is None:
            assert time.time() < deadline, "the scheduled initiator started no round"
            time.sleep(0.1)
        assert federation.initiator.scheduled_failures == 0
        assert federation.averager.scheduled_failures == 0

    assert os.environ.get("AWS_ENDPOINT_URL") == before
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint, timeout=5)  # noqa: S310 (the stopped local endpoint)


def test_the_initiator_s_round_notice_reaches_a_subscribed_client_through_the_broker(
    federation: LocalFederation,
) -> None:
    """Local mode plays IoT Core with a real MQTT broker: the client's subscription (the
    device's own ``RoundNotices``, over an MQTT connection instead of Greengrass IPC) hears
    the notice the initiator publishes once the round's assignment is written."""
    import threading

    settings = federation.client_settings("c1", data_dir=Path("."))
    assert settings.notice_topic == federation.notice_topic
    notices = federation.round_notices(settings)
    assert notices is not None and notices.connect() and notices.live
    try:
        ClientRegistry(federation.clients.dynamodb, federation.names.clients_table).heartbeat(
            "c1", now=time.time(), active_window_seconds=federation.config.active_window_seconds
        )
        assert federation.start_round()["started"]
        assert notices.wait(30, threading.Event())  # woken by the notice, not by the time-out
        assert notices.heard == 1 and notices.ignored == 0
    finally:
        notices.close()
    assert not notices.live


def test_without_push_the_initiator_publishes_nothing_and_clients_only_poll(
    local_aws: object, tmp_path: Path
) -> None:
    config = FederationConfig(experiment="polling")
    with LocalFederation(config, aws=local_aws, push=False) as federation:  # type: ignore[arg-type]
        settings = federation.client_settings("c1", data_dir=tmp_path)
        assert settings.notice_topic == "" and federation.round_notices(settings) is None
        assert federation.initiator.module.notice_publisher() is None
