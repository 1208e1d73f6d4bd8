"""The Lambda handlers take events in AWS's own shapes (fixtures in tests/events/)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sfl.core.events import control_action
from sfl.local.lambdas import LocalFunction
from sfl.server.initiator import start_round
from sfl.server.notifications import s3_updates
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import TINY_MODEL, TRAINED, Stack

EVENTS = Path(__file__).parent / "events"


CAPTURED_TIMES = {  # when S3 stored the objects of the captured two-record event
    "EVENT_TIME_A": "2026-11-28T04:31:54.217Z",
    "EVENT_TIME_B": "2026-11-28T04:31:54.301Z",
}


def _fixture(name: str, **replace: str) -> dict[str, Any]:
    text = (EVENTS / name).read_text()
    replace = {**CAPTURED_TIMES, **replace}
    for old, new in replace.items():
        text = text.replace(old, new)
    return json.loads(text)  # type: ignore[no-any-return]


def test_s3_records_are_url_decoded() -> None:
    updates = s3_updates(_fixture("s3_put_two_records.json"))
    assert [u.key for u in updates] == [
        "updates/device:a/round-000001.safetensors",
        "updates/device-b/round-000001.safetensors",
    ]
    assert s3_updates(_fixture("s3_test_event.json")) == []


def test_s3_records_carry_when_s3_stored_the_object() -> None:
    first, second = s3_updates(_fixture("s3_put_two_records.json"))
    assert first.uploaded_at == datetime(2026, 11, 28, 4, 31, 54, 217000, UTC).timestamp()
    assert second.uploaded_at is not None and second.uploaded_at > first.uploaded_at
    broken = _fixture("s3_put_two_records.json")
    broken["Records"][0]["eventTime"] = "yesterday"
    del broken["Records"][1]["eventTime"]
    assert [u.uploaded_at for u in s3_updates(broken)] == [None, None]


def test_schedule_event_is_a_tick() -> None:
    assert control_action(_fixture("scheduled_tick.json")) == "tick"
    assert control_action({"sfl": "bootstrap"}) == "bootstrap"
    assert control_action(_fixture("s3_put_two_records.json")) is None


def test_one_event_with_two_records_answers_for_both_clients(stack: Stack) -> None:
    stack.put_model(0, TINY_MODEL)
    stack.register("device:a", "device-b")
    start_round(stack.clients, stack.names, stack.config)
    etag_a = stack.upload_update("device:a", 1, TRAINED)["Records"][0]["s3"]["object"]["eTag"]
    etag_b = stack.upload_update("device-b", 1, TRAINED)["Records"][0]["s3"]["object"]["eTag"]
    stored = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event = _fixture(
        "s3_put_two_records.json",
        BUCKET=stack.names.updates_bucket,
        ETAG_A=etag_a,
        ETAG_B=etag_b,
        EVENT_TIME_A=stored,
        EVENT_TIME_B=stored,
    )

    result = LocalFunction("averager").invoke(event)

    assert [o["result"] for o in result["outcomes"]] == ["accepted", "accepted"]
    assert result["outcomes"][1]["finished_round"] == 1
    round_ = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED


def test_scheduled_tick_with_nothing_to_do(stack: Stack) -> None:
    result = LocalFunction("averager").invoke(_fixture("scheduled_tick.json"))
    assert result == {"tick": "no rounds yet", "round": None, "status": ""}


def test_unknown_control_event_is_an_error(stack: Stack) -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown control event 'reboot'"):
        LocalFunction("averager").invoke({"sfl": "reboot"})


def test_initiator_handler_returns_why_it_did_not_start(stack: Stack) -> None:
    result = LocalFunction("initiator").invoke(_fixture("scheduled_tick.json"))
    assert result["started"] is False
    assert "global model version 0 is not in the models bucket" in result["reason"]


def test_a_scheduled_tick_that_crashes_is_counted_and_the_next_tick_finishes_the_round(
    stack: Stack,
) -> None:
    """EventBridge invokes the tick asynchronously: a crash mid-aggregation (here in the
    tick that recovered an update whose S3 event was lost) must not stop the schedule."""
    import time

    from sfl.core import layout
    from sfl.local.emulator import lambda_environment
    from sfl.local.faults import reset_averager_crash

    stack.config = stack.config.replace(
        aggregation="sfl.local.faults:CrashOnceFedAvg", aggregation_lease_seconds=5
    )
    reset_averager_crash()
    stack.put_model(0, TINY_MODEL)
    stack.register("a")
    with lambda_environment(stack.env()):
        start_round(stack.clients, stack.names, stack.config)
        stack.upload_update("a", 1, TRAINED)  # its S3 event is never delivered
        averager = LocalFunction("averager")
        store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)

        assert averager.invoke_scheduled(_fixture("scheduled_tick.json")) is False
        assert averager.scheduled_failures == 1
        stuck = store.get("test", 1)
        assert stuck is not None and stuck.status is RoundState.AGGREGATING

        time.sleep(5.2)  # the crashed invocation's aggregation lease runs out
        assert averager.invoke_scheduled(_fixture("scheduled_tick.json")) is True

    closed = store.get("test", 1)
    assert closed is not None and closed.status is RoundState.CLOSED
    assert closed.aggregation_attempts == 2 and closed.model_version == 1
    versions = stack.clients.s3.list_object_versions(
        Bucket=stack.names.models_bucket, Prefix=layout.model_key(1)
    )
    assert len(versions["Versions"]) == 1
