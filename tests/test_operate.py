"""The operator's commands against a running local federation (``sfl local up``'s fleet).

One fleet for the module: three real edge clients, both handlers in-process, moto over HTTP.
Its initiator schedule is an hour, so rounds start only when a test runs ``sfl start-round``:
the story below (start, watch, reconfigure, pause, promote, roll back, report) is
deterministic, and every assertion reads back what the command changed in S3 or DynamoDB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sfl.core import layout
from sfl.core.config import ConfigError, FederationConfig
from sfl.learning import codec
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import ArrayDataset
from sfl.local.fleet import FleetOptions, LocalFleet
from sfl.ops.federation import connect
from sfl.server.averager import Averager
from sfl.server.evaluation import encode_eval_set
from sfl.state.control import ControlStore
from sfl.state.lineage import LineageStore
from sfl.state.rounds import RoundState, RoundStore

CLIENTS = 3
# moto's backends are per process: a name no other test's stack in this session uses.
STACK = "Sfl-OperateTest"
pytestmark = pytest.mark.slow  # one running fleet, about a minute for the whole story


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    out = tmp_path_factory.mktemp("fleet")
    with LocalFleet(
        FleetOptions(
            out=out, clients=CLIENTS, schedule_seconds=3600.0, tick_seconds=0.5, stack=STACK
        )
    ) as running:
        fed = connect(STACK, endpoint_url=running.endpoint_url)
        deadline = time.time() + 60
        while sfl_json(running, "status")["active_devices"] < CLIENTS:
            assert time.time() < deadline, "the fleet's clients never registered"
            time.sleep(0.2)
        assert fed.local
        yield running


def sfl(fleet: LocalFleet, *argv: str) -> tuple[int, str, str]:
    """Run ``sfl ARGV --endpoint URL`` in this process; (exit code, stdout, stderr)."""
    import contextlib
    import io

    from sfl.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    stack = [] if "--stack" in argv else ["--stack", STACK]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--endpoint", fleet.endpoint_url, *stack])
    return code, out.getvalue(), err.getvalue()


def sfl_json(fleet: LocalFleet, *argv: str) -> Any:
    code, out, err = sfl(fleet, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def rounds(fleet: LocalFleet) -> RoundStore:
    federation = fleet.federation
    return RoundStore(federation.aws.clients().dynamodb, federation.names.rounds_table)


def run_round(fleet: LocalFleet) -> int:
    """``sfl start-round``, then ``sfl watch`` until that round has finished."""
    started = sfl_json(fleet, "start-round")
    assert started["started"], started
    number = int(started["round"])
    code, out, err = sfl(fleet, "watch", "--until-round", str(number), "--timeout", "90")
    assert code == 0, err
    assert f"round {number} CLOSED" in out
    # The averager scores the new model and writes its lineage right after closing the round:
    # wait for that, as an operator would for the accuracy column.
    deadline = time.time() + 60
    while not (record := rounds(fleet).get("default", number)) or not record.evaluation:
        assert time.time() < deadline, f"round {number} was never scored"
        time.sleep(0.1)
    return number


def s3_bytes(fleet: LocalFleet, key: str) -> bytes:
    s3 = fleet.federation.aws.clients().s3
    return bytes(s3.get_object(Bucket=fleet.federation.names.models_bucket, Key=key)["Body"].read())


def test_status_before_the_first_round(fleet: LocalFleet) -> None:
    status = sfl_json(fleet, "status")
    assert status["round"] is None and status["latest_model"] is None
    assert status["active_devices"] == CLIENTS and status["local"] is True
    assert {a["name"] for a in status["alarms"]} == {
        f"{STACK}-{a}"
        for a in (
            "InitiatorErrorsAlarm",
            "AveragerErrorsAlarm",
            "FailedEventsAlarm",
            "OverdueRoundAlarm",
        )
    }
    code, out, _ = sfl(fleet, "status")
    assert code == 0 and "round:       none yet" in out and "3 active of 3 known" in out


def test_start_round_and_watch_record_held_out_accuracy(fleet: LocalFleet) -> None:
    number = run_round(fleet)
    record = rounds(fleet).get("default", number)
    assert record is not None and record.status is RoundState.CLOSED
    assert len(record.selected) == CLIENTS and record.config_version == 0
    # The averager scored the new model on the held-out set the fleet uploaded (the task's
    # test split): the same number as scoring the version here.
    task = load_task("digits")
    model = task.build_model()
    model.load_state_dict(
        codec.decode(s3_bytes(fleet, layout.model_key(record.model_version or 0)))
    )
    expected = task.evaluate(model, task.load_central_data().test).accuracy
    assert record.evaluation["accuracy"] == pytest.approx(expected)
    status = sfl_json(fleet, "status")
    assert status["latest_model"]["version"] == record.model_version
    assert status["latest_model"]["accuracy"] == pytest.approx(expected)
    lineage = json.loads(s3_bytes(fleet, layout.lineage_key(record.model_version or 0)))
    assert lineage["parent"] == record.base_version and lineage["round"] == number
    assert sorted(lineage["participants"]) == sorted(record.accepted)
    assert lineage["metrics"]["accuracy"] == pytest.approx(expected)


def test_rounds_lists_every_record(fleet: LocalFleet) -> None:
    rows = sfl_json(fleet, "rounds")
    records = rounds(fleet).history("default")
    assert [r["round"] for r in rows] == [r.round for r in records]
    assert rows[-1]["accepted"] == len(records[-1].accepted)
    code, out, _ = sfl(fleet, "rounds")
    assert code == 0 and "CLOSED" in out and "0->1" in out


def test_config_set_reaches_the_next_round_and_its_averager(fleet: LocalFleet) -> None:
    changed = sfl_json(fleet, "config", "set", "lr=0.02", "local_epochs=2", "--note", "finer")
    assert changed["version"] == 1 and changed["changed"] == {"lr": 0.02, "local_epochs": 2}
    number = run_round(fleet)
    record = rounds(fleet).get("default", number)
    assert record is not None
    assert record.config_version == 1 and record.train_config["lr"] == 0.02
    assert record.train_config["local_epochs"] == 2
    # The averager judges the round by the configuration it recorded, not the deployed one.
    averager = Averager(fleet.federation.aws.clients(), fleet.federation.names, fleet.config)
    assert fleet.config.lr != 0.02 and averager.round_config(record).lr == 0.02
    shown = sfl_json(fleet, "config", "show")
    lr = next(k for k in shown["keys"] if k["key"] == "lr")
    assert lr == {"key": "lr", "value": 0.02, "source": "runtime", "deployed": fleet.config.lr}
    history = sfl_json(fleet, "config", "history")
    assert [v["version"] for v in history] == [1] and history[0]["note"] == "finer"


def test_config_set_refuses_bad_values_with_the_config_message(fleet: LocalFleet) -> None:
    with pytest.raises(ConfigError) as expected:
        FederationConfig().with_overrides({"lr": "20"}, source="sfl config set")
    code, _, err = sfl(fleet, "config", "set", "lr=20")
    assert code == 2 and str(expected.value) in err
    code, _, err = sfl(fleet, "config", "set", "round_soft_deadline_seconds=99999")
    assert code == 2 and "round_soft_deadline_seconds" in err
    code, _, err = sfl(fleet, "config", "set", "task=mnist")
    assert code == 2 and "fixed at deploy time" in err
    state = ControlStore(
        fleet.federation.aws.clients().dynamodb, fleet.federation.names.rounds_table
    )
    assert state.state("default").config_version == 1  # nothing was written


def test_config_unset_returns_a_key_to_the_deployed_value(fleet: LocalFleet) -> None:
    changed = sfl_json(fleet, "config", "unset", "local_epochs")
    assert (
        changed["version"] == 2 and changed["config"]["local_epochs"] == fleet.config.local_epochs
    )
    assert changed["config"]["lr"] == 0.02


def test_config_set_checks_a_change_against_the_configuration_in_force(fleet: LocalFleet):
    """A rule's parameters are checked against the rule in force (set at runtime), not the
    deployed one; a mistyped key gets a suggestion."""
    assert sfl_json(fleet, "config", "set", "aggregation=fedadam")["config"]["aggregation"] == (
        "fedadam"
    )
    changed = sfl_json(fleet, "config", "set", 'aggregation_params={"eta": 0.05}')
    assert json.loads(changed["config"]["aggregation_params"]) == {"eta": 0.05}
    code, _, err = sfl(fleet, "config", "set", "local_epoch=2")
    assert code == 2 and "did you mean 'local_epochs' for 'local_epoch'?" in err
    restored = sfl_json(fleet, "config", "unset", "aggregation", "aggregation_params")
    assert restored["config"]["aggregation"] == fleet.config.aggregation


def test_pause_stops_new_rounds_until_resume(fleet: LocalFleet) -> None:
    before = len(rounds(fleet).history("default"))
    assert sfl_json(fleet, "pause", "--reason", "maintenance") == {
        "paused": True,
        "reason": "maintenance",
    }
    code, out, err = sfl(fleet, "start-round", "--json")  # it ran, and started nothing
    refused = json.loads(out)
    assert code == 1 and refused["started"] is False and "paused" in refused["reason"]
    assert json.loads(err)["error"].startswith("no round started: ")
    assert len(rounds(fleet).history("default")) == before
    # Pausing again keeps the first reason unless given a new one.
    assert sfl(fleet, "pause")[0] == 0
    code, out, _ = sfl(fleet, "status")
    assert code == 0
    assert "PAUSED (maintenance)" in out
    assert sfl_json(fleet, "resume") == {"paused": False}
    run_round(fleet)
    assert len(rounds(fleet).history("default")) == before + 1


def test_models_list_pull_and_promote(fleet: LocalFleet, tmp_path: Path) -> None:
    models = sfl_json(fleet, "models", "list")
    newest = max(m["version"] for m in models)
    assert [m["version"] for m in models] == list(range(newest + 1))
    for m in models[1:]:
        assert m["kind"] == "round" and m["parent"] == m["version"] - 1
        assert m["accuracy"] is not None and len(m["participants"]) == CLIENTS
    assert models[2]["config_version"] == 1
    pulled = sfl_json(fleet, "models", "pull", "1", "--out", str(tmp_path / "v1.safetensors"))
    assert (tmp_path / "v1.safetensors").read_bytes() == s3_bytes(fleet, layout.model_key(1))
    assert pulled["version"] == 1
    promoted = sfl_json(fleet, "models", "promote", "1")
    assert promoted["promoted"] == 1
    assert s3_bytes(fleet, layout.PROMOTED_MODEL_KEY) == s3_bytes(fleet, layout.model_key(1))
    assert sfl_json(fleet, "status")["promoted_version"] == 1
    assert [m["version"] for m in sfl_json(fleet, "models", "list") if m["promoted"]] == [1]
    code, _, err = sfl(fleet, "models", "promote", "999")
    assert code == 1 and "model version 999 does not exist" in err


def test_rollback_starts_the_next_round_from_an_earlier_version(fleet: LocalFleet) -> None:
    newest = max(LineageStore(fleet.federation.aws.clients(), fleet.federation.names).versions())
    assert sfl_json(fleet, "models", "rollback", "1") == {"rollback_to": 1, "newest": newest}
    number = run_round(fleet)
    record = rounds(fleet).get("default", number)
    assert record is not None and record.base_version == newest + 1
    copy = codec.decode(s3_bytes(fleet, layout.model_key(newest + 1)))
    original = codec.decode(s3_bytes(fleet, layout.model_key(1)))
    assert all(torch.equal(copy[k], original[k]) for k in original)
    header = codec.parse_header(s3_bytes(fleet, layout.model_key(newest + 1)))
    assert header.metadata["version"] == str(newest + 1)  # what devices check
    models = {m["version"]: m for m in sfl_json(fleet, "models", "list")}
    assert models[newest + 1]["kind"] == "rollback" and models[newest + 1]["parent"] == 1
    assert models[newest + 2]["parent"] == newest + 1
    assert sfl_json(fleet, "status")["rollback_to"] is None  # carried out once
    code, _, err = sfl(fleet, "models", "rollback", "--cancel")  # nothing left to cancel
    assert code == 1 and "no rollback is pending" in err


def test_a_pending_rollback_can_be_cancelled_once(fleet: LocalFleet) -> None:
    assert sfl_json(fleet, "models", "rollback", "1")["rollback_to"] == 1
    assert sfl_json(fleet, "models", "rollback", "--cancel") == {
        "cancelled": True,
        "rollback_to": 1,
    }
    assert sfl_json(fleet, "status")["rollback_to"] is None
    code, out, err = sfl(fleet, "models", "rollback", "--cancel")
    assert code == 1 and out == "" and "no rollback is pending" in err


def test_devices_count_answers_from_the_round_records(fleet: LocalFleet) -> None:
    devices = sfl_json(fleet, "devices")
    records = rounds(fleet).history("default")
    assert sorted(d["client_id"] for d in devices) == sorted(records[0].selected)
    for d in devices:
        assert d["active"] is True
        assert d["rounds_answered"] == sum(d["client_id"] in r.accepted for r in records)
        assert d["rounds_picked"] == sum(d["client_id"] in r.selected for r in records)
    code, out, _ = sfl(fleet, "devices")
    assert code == 0 and "client-00" in out


def test_eval_data_upload_refuses_a_bad_set_and_scores_with_a_new_one(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(
        encode_eval_set(
            ArrayDataset(x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64)), task="x"
        )
    )
    code, _, err = sfl(fleet, "eval-data", "upload", "--file", str(bad))
    assert code == 2 and "cannot score this set" in err
    test = load_task("digits").load_central_data().test
    small = tmp_path / "small.safetensors"
    small.write_bytes(encode_eval_set(ArrayDataset(x=test.x[:50], y=test.y[:50]), task="digits"))
    uploaded = sfl_json(fleet, "eval-data", "upload", "--file", str(small))
    assert uploaded["examples"] == 50
    assert s3_bytes(fleet, layout.EVAL_DATA_KEY) == small.read_bytes()
    number = run_round(fleet)
    record = rounds(fleet).get("default", number)
    assert record is not None and record.evaluation["examples"] == 50


def test_report_writes_history_and_charts(fleet: LocalFleet, tmp_path: Path) -> None:
    result = sfl_json(fleet, "report", "--out", str(tmp_path / "report"))
    history = json.loads((tmp_path / "report" / "history.json").read_text())
    assert history["schema"] == "sfl-report-history/2"
    assert len(history["models"]) == len(sfl_json(fleet, "models", "list", "--all"))
    records = rounds(fleet).history("default")
    assert [r["round"] for r in history["rounds"]] == [r.round for r in records]
    # Each round's cost is the one its close recorded, not a second estimate.
    for row, record in zip(history["rounds"], records, strict=True):
        if record.status is RoundState.CLOSED:
            assert row["cost"] == json.loads(json.dumps(record.summary["cost"]))
            assert row["cost"]["usd"] > 0
        else:
            assert row["cost"]["usd"] is None and row["cost"]["unpriced"]
    assert [v["version"] for v in history["config_versions"]] == [1, 2, 3, 4, 5]
    names = sorted(Path(p).name for p in result["charts"])
    assert names == [
        "accuracy.png",
        "cost.png",
        "participation.png",
        "rejections.png",
        "round_time.png",
    ]
    for name in names:
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alarm_in_alarm_state_shows_in_status(fleet: LocalFleet) -> None:
    cloudwatch = fleet.federation.aws.client("cloudwatch")
    name = f"{STACK}-AveragerErrorsAlarm"
    cloudwatch.set_alarm_state(AlarmName=name, StateValue="ALARM", StateReason="test")
    try:
        code, out, _ = sfl(fleet, "status")
        assert code == 0 and f"{name}" in out and "in ALARM" in out
    finally:
        cloudwatch.set_alarm_state(AlarmName=name, StateValue="OK", StateReason="test")


def test_missing_stack_is_a_clear_error(fleet: LocalFleet) -> None:
    code, out, err = sfl(fleet, "status", "--stack", "NoSuchStack")
    assert code == 1 and out == ""
    assert "stack 'NoSuchStack' not found at http://127.0.0.1" in err


def test_missing_credentials_are_a_clear_error(fleet: LocalFleet, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REGION": "us-east-1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sfl.cli.main",
            "status",
            "--endpoint",
            fleet.endpoint_url,
            "--stack",
            STACK,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "sfl status: no AWS credentials found: set AWS_PROFILE or run 'aws configure' (or "
        "'aws sso login'); for local mode, export the variables 'sfl local up' printed"
    )
    del env["AWS_REGION"]
    result = subprocess.run(
        [sys.executable, "-m", "sfl.cli.main", "rounds"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "no AWS region" in result.stderr


def test_logs_reads_cloudwatch_logs_by_round_and_device(fleet: LocalFleet) -> None:
    """On AWS ``sfl logs`` filters the functions' log groups by the JSON fields Powertools
    writes; here against the emulator's CloudWatch Logs with lines in that shape."""
    import dataclasses

    from sfl.ops.federation import LOCAL_OUTPUT
    from sfl.ops.logs import read_logs

    fed = connect(STACK, endpoint_url=fleet.endpoint_url)
    logs = fed.client("logs")
    logs.create_log_group(logGroupName="/aws/lambda/averager-test")
    logs.create_log_stream(logGroupName="/aws/lambda/averager-test", logStreamName="s")
    now = int(time.time() * 1000)
    lines = [
        {"level": "INFO", "message": "update accepted", "round": 7, "client_id": "edge-1"},
        {"level": "WARNING", "message": "update rejected", "round": 7, "client_id": "edge-2"},
        {"level": "INFO", "message": "update accepted", "round": 8, "client_id": "edge-1"},
    ]
    logs.put_log_events(
        logGroupName="/aws/lambda/averager-test",
        logStreamName="s",
        logEvents=[{"timestamp": now + i, "message": json.dumps(x)} for i, x in enumerate(lines)],
    )
    on_aws = dataclasses.replace(
        fed,
        outputs={
            **fed.outputs,
            LOCAL_OUTPUT: "false",
            "AveragerLogGroupName": "/aws/lambda/averager-test",
        },
    )
    found = read_logs(on_aws, round_=7, client="edge-2")
    assert [(x["message"], x["client_id"]) for x in found] == [("update rejected", "edge-2")]
    assert [x["round"] for x in read_logs(on_aws, client="edge-1")] == [7, 8]


def test_the_cloudwatch_filter_is_the_documented_json_pattern() -> None:
    """CloudWatch Logs' metric-filter syntax for JSON log events: ``{ $.field = value }``
    joined with ``&&``, strings quoted (moto ignores the pattern, so its text is tested)."""
    from sfl.ops.logs import filter_pattern

    assert filter_pattern(7, "edge-2") == '{ $.round = 7 && $.client_id = "edge-2" }'
    assert filter_pattern(None, None) == ""
