"""Structured logs and embedded-metric-format metrics from the averager handler."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from sfl.local.emulator import lambda_environment
from sfl.local.lambdas import LocalFunction
from sfl.server.initiator import start_round
from tests.conftest import TINY_MODEL, TRAINED, Stack


@pytest.fixture
def averager_output(stack: Stack) -> Iterator[tuple[LocalFunction, io.StringIO]]:
    """The averager with metrics on and its JSON log lines captured."""
    env = {**stack.env(), "POWERTOOLS_METRICS_DISABLED": "false", "POWERTOOLS_LOG_LEVEL": "INFO"}
    with lambda_environment(env):
        function = LocalFunction("averager")
        handler = function.module.logger.registered_handler
        assert isinstance(handler, logging.StreamHandler)
        logs = io.StringIO()
        previous = handler.setStream(logs)
        level = function.module.logger.log_level
        function.module.logger.setLevel("INFO")
        # The core's records go to the last loaded handler module's log handler in this process
        # (in Lambda there is only one); whichever was loaded last, route them to this one here.
        core = logging.getLogger("sfl")
        core_handlers, core_level = list(core.handlers), core.level
        core.handlers = [handler]
        core.setLevel("INFO")
        try:
            yield function, logs
        finally:
            handler.setStream(previous)
            function.module.logger.setLevel(level)
            core.handlers = core_handlers
            core.setLevel(core_level)


def _emf(stdout: str) -> list[dict[str, Any]]:
    """EMF records from stdout, each metric's values summed (Powertools may batch them)."""
    records = []
    for line in stdout.splitlines():
        if line.startswith('{"_aws"'):
            record = json.loads(line)
            records.append({k: sum(v) if isinstance(v, list) else v for k, v in record.items()})
    return records


def test_rejections_are_counted_by_reason_and_logged_with_round_and_client(
    stack: Stack,
    averager_output: tuple[LocalFunction, io.StringIO],
    capsys: pytest.CaptureFixture[str],
) -> None:
    averager, logs = averager_output
    stack.put_model(0, TINY_MODEL)
    stack.register("honest", "pickler")
    start_round(stack.clients, stack.names, stack.config)

    averager.invoke(stack.upload_update("pickler", 1, {}, body=b"\x80\x04not a model"))
    averager.invoke(stack.upload_update("honest", 1, TRAINED))

    records = _emf(capsys.readouterr().out)
    by_reason = [r for r in records if "reason" in r]
    assert [(r["reason"], r["UpdatesRejectedByReason"]) for r in by_reason] == [
        ("not_safetensors", 1.0)
    ]
    assert by_reason[0]["service"] == "sfl-averager"
    assert (
        by_reason[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "ServerlessFederatedLearning"
    )
    totals = [r for r in records if "UpdatesAccepted" in r or "UpdatesRejected" in r]
    assert any(r.get("UpdatesRejected") == 1.0 for r in totals)
    closing = [r for r in records if "RoundsClosed" in r]
    assert len(closing) == 1
    assert closing[0]["Participants"] == 1.0 and closing[0]["RoundDuration"] >= 0
    assert closing[0]["UpdateBytes"] > 0 and closing[0]["AggregationTime"] >= 0

    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    rejected = [line for line in lines if line["message"] == "update rejected"]
    assert rejected and rejected[0]["client_id"] == "pickler" and rejected[0]["round"] == 1
    assert rejected[0]["reason"].startswith("not_safetensors")
    assert all("round" in line for line in lines if line["message"] != "initiator finished")


def test_with_metrics_disabled_a_rejection_prints_no_metrics(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """Local mode disables metrics: its output stays the progress table, nothing else."""
    env = {**stack.env(), "POWERTOOLS_METRICS_DISABLED": "true"}
    with lambda_environment(env):
        stack.put_model(0, TINY_MODEL)
        stack.register("pickler")
        start_round(stack.clients, stack.names, stack.config)
        capsys.readouterr()
        result = LocalFunction("averager").invoke(
            stack.upload_update("pickler", 1, {}, body=b"\x80\x04not a model")
        )

    assert result["outcomes"][0]["reason"].startswith("not_safetensors")
    assert _emf(capsys.readouterr().out) == []
