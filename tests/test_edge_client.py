"""The edge client as a device runs it: settings, cheap polling, one round, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_client.client import EdgeClient
from edge_client.settings import parse_settings
from sfl import layout
from sfl.averager import bootstrap_model
from sfl.codec import UpdateMetadata, parse_header
from sfl.initiator import start_round
from sfl.splits import write_client_splits
from sfl.tasks import load_task
from tests.conftest import Stack

REPO = Path(__file__).resolve().parents[1]


def test_settings_from_flags_and_environment(tmp_path: Path) -> None:
    env = {
        "AWS_IOT_THING_NAME": "thing-7",
        "SFL_MODELS_BUCKET": "m",
        "SFL_UPDATES_BUCKET": "u",
        "SFL_CLIENTS_TABLE": "t",
        "SFL_DATA_DIR": str(tmp_path),
        "SFL_POLL_SECONDS": "2.5",
    }
    settings = parse_settings(["--task", "mnist"], env)
    assert settings.client_id == "thing-7"
    assert (
        settings.task == "mnist" and settings.poll_seconds == 2.5 and settings.data_dir == tmp_path
    )

    flagged = parse_settings(["--client-id", "bare-metal-1"], env)
    assert flagged.client_id == "bare-metal-1"


def test_missing_setting_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(["--client-id", "c1", "--data-dir", "/tmp"], {})
    assert caught.value.code == 2
    assert "--models-bucket is required (or set SFL_MODELS_BUCKET)" in capsys.readouterr().err


def test_bad_client_id_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--client-id", "../etc"], {})
    assert "client id '../etc'" in capsys.readouterr().err


def _client_env(stack: Stack, client_id: str, data_dir: Path) -> dict[str, str]:
    return {
        **stack.aws.env(),
        "SFL_CLIENT_ID": client_id,
        "SFL_MODELS_BUCKET": stack.names.models_bucket,
        "SFL_UPDATES_BUCKET": stack.names.updates_bucket,
        "SFL_CLIENTS_TABLE": stack.names.clients_table,
        "SFL_DATA_DIR": str(data_dir),
        "SFL_POLL_SECONDS": "0.2",
    }


def test_polling_an_unchanged_assignment_is_a_not_modified(stack: Stack, tmp_path: Path) -> None:
    stack.clients.s3.put_object(
        Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY, Body=b'{"round": 0}'
    )
    settings = parse_settings([], _client_env(stack, "c1", tmp_path))
    client = EdgeClient(settings, stack.clients, load_task("digits"))

    first = client.poll()
    etag = client._assignment_etag
    second = client.poll()

    assert first is None  # unreadable assignment (no fields) is ignored, not fatal
    assert etag is not None and second is None and client._assignment_etag == etag


def test_device_process_answers_a_round_and_exits_cleanly_on_sigterm(
    stack: Stack, tmp_path: Path
) -> None:
    task = load_task("digits")
    write_client_splits(task, tmp_path, 2, "iid", seed=1, client_ids=["device-1", "device-2"])
    bootstrap_model(stack.clients, stack.names, task.build_model(seed=0).state_dict(), seed=0)
    env = {**os.environ, **_client_env(stack, "device-1", tmp_path / "device-1")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_client", "--heartbeat-seconds", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        result = start_round(stack.clients, stack.names, stack.config)
        while not result.started and time.time() < deadline:  # wait for the device to register
            time.sleep(0.3)
            result = start_round(stack.clients, stack.names, stack.config)
        assert result.started and result.selected == ("device-1",)
        key = layout.update_key("device-1", 1)
        while time.time() < deadline:
            listing = stack.clients.s3.list_objects_v2(
                Bucket=stack.names.updates_bucket, Prefix=key
            )
            if listing.get("KeyCount"):
                break
            time.sleep(0.3)
        body = stack.clients.s3.get_object(Bucket=stack.names.updates_bucket, Key=key)[
            "Body"
        ].read()
        meta = UpdateMetadata.from_header(parse_header(body).metadata)
        assert meta.client_id == "device-1" and meta.round == 1 and meta.num_examples > 0
        assert 0.0 <= meta.metrics["accuracy"] <= 1.0 and meta.timings["train_s"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "client stopped" in err


def test_a_restarted_client_keeps_its_turnaround_average(stack: Stack, tmp_path: Path) -> None:
    task = load_task("digits")
    write_client_splits(task, tmp_path, 1, "iid", seed=0, client_ids=["device-9"])
    stack.register("device-9", ewma=4.25)
    settings = parse_settings([], _client_env(stack, "device-9", tmp_path / "device-9"))
    stop = threading.Event()
    stop.set()  # start, read state, stop at once
    client = EdgeClient(settings, stack.clients, task, stop=stop)

    assert client.run() == 0
    assert client.ewma == 4.25
