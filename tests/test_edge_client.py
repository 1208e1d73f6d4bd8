"""The edge client as a device runs it: settings, cheap polling, one round, clean SIGTERM;
and what it downloads (assignment, global model) treated as untrusted input."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.stub import Stubber

from edge_client.client import Assignment, AssignmentUnreadable, EdgeClient
from edge_client.global_model import ModelRejected, check_global_model
from edge_client.settings import parse_settings
from sfl.core import layout
from sfl.learning import codec
from sfl.learning.codec import UpdateMetadata, parse_header
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.server.averager import bootstrap_model
from sfl.server.initiator import start_round
from sfl.state.aws import AwsCallFailed, AwsClients, aws_call
from sfl.state.registry import DEVICE_ATTRIBUTES
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
    # As on a device, scikit-learn is not there (requirements/edge.txt leaves it out).
    without_sklearn = (
        "import runpy, sys; sys.modules['sklearn'] = None; "
        "sys.argv = ['edge_client', '--heartbeat-seconds', '1']; "
        "runpy.run_module('edge_client', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", without_sklearn],
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


# --- the registry: a device writes only that it is alive -----------------------------------


def _device(stack: Stack, tmp_path: Path, client_id: str = "c1") -> EdgeClient:
    task = load_task("digits")
    write_client_splits(task, tmp_path, 1, "iid", seed=0, client_ids=[client_id])
    client = EdgeClient(
        parse_settings([], _client_env(stack, client_id, tmp_path / client_id)),
        stack.clients,
        task,
    )
    return client


def _picked(stack: Stack, client: EdgeClient) -> Assignment:
    client.heartbeat()
    started = start_round(stack.clients, stack.names, stack.config)
    assert started.started and started.selected == (client.settings.client_id,), started
    assignment = client.poll()
    assert assignment is not None and client._should_answer(assignment)
    return assignment


def _updates(stack: Stack) -> int:
    listing = stack.clients.s3.list_objects_v2(Bucket=stack.names.updates_bucket)
    return int(listing.get("KeyCount", 0))


def test_after_a_round_the_registry_holds_only_what_a_device_may_write(
    stack: Stack, tmp_path: Path
) -> None:
    client = _device(stack, tmp_path)
    bootstrap_model(
        stack.clients, stack.names, client.task.build_model(seed=0).state_dict(), seed=0
    )

    client.answer(_picked(stack, client))

    assert client.rounds_answered == 1 and _updates(stack) == 1
    item = stack.clients.dynamodb.get_item(
        TableName=stack.names.clients_table, Key={"client_id": {"S": "c1"}}
    )["Item"]
    assert set(item) == set(DEVICE_ATTRIBUTES)  # no turnaround, no answer count: the server's


# --- the global model: checked like an update, a bad one costs the round --------------------


def _state() -> dict[str, torch.Tensor]:
    return dict(load_task("digits").build_model(seed=0).state_dict())


def _nan(state: dict[str, torch.Tensor]) -> bytes:
    poisoned = {k: v.clone() for k, v in state.items()}
    next(iter(poisoned.values())).view(-1)[0] = float("nan")
    return codec.encode_model(poisoned, version=0)


def _bad_header(state: dict[str, torch.Tensor]) -> bytes:
    header = b'{"w": {"dtype": ["F32"], "shape": [1e999], "data_offsets": [0, 4]}}'
    return len(header).to_bytes(8, "little") + header + b"\0" * 4


BAD_MODELS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], bytes], str]] = {
    "NaN values": (_nan, "non_finite"),
    "malformed header": (_bad_header, "bad_header"),
    "a pickle": (lambda s: b"\x80\x04\x95" + b"\0" * 64, "not_safetensors"),
    "another version": (lambda s: codec.encode_model(s, version=7), "wrong_version"),
    "an update, not a model": (
        lambda s: codec.encode(s, {"format": "sfl-update/1"}),
        "not_a_model",
    ),
    "other shapes": (
        lambda s: codec.encode_model({k: v.reshape(-1) for k, v in s.items()}, version=0),
        "tensor_signature",
    ),
    "oversized": (
        lambda s: codec.encode_model({**s, "pad": torch.zeros(100_000)}, version=0),
        "too_large",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_global_model_checks_name_a_stable_reason(case: str) -> None:
    make, reason = BAD_MODELS[case]
    state = _state()
    with pytest.raises(ModelRejected) as caught:
        check_global_model(make(state), version=0, reference=state)
    if case != "malformed header":  # the codec names header faults in its own words
        assert caught.value.reason == reason


def test_a_sound_global_model_passes_the_checks() -> None:
    state = _state()
    tensors = check_global_model(codec.encode_model(state, version=3), version=3, reference=state)
    assert set(tensors) == set(state) and all(torch.equal(tensors[k], state[k]) for k in state)


@pytest.mark.parametrize("case", ["NaN values", "malformed header", "another version", "oversized"])
def test_a_bad_global_model_costs_the_round_not_the_client(
    stack: Stack, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = _device(stack, tmp_path)
    stack.clients.s3.put_object(
        Bucket=stack.names.models_bucket,
        Key=layout.model_key(0),
        Body=BAD_MODELS[case][0](_state()),
    )
    assignment = _picked(stack, client)

    with caplog.at_level(logging.WARNING, logger="edge_client"):
        client.answer(assignment)  # returns; never trains on it, never raises

    assert (client.rounds_skipped, client.rounds_answered, _updates(stack)) == (1, 0, 0)
    assert "global model refused" in caplog.text


# --- the assignment: a malformed one is skipped ----------------------------------------------


def _assignment(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "experiment": "test",
        "round": 3,
        "status": "OPEN",
        "base_version": 2,
        "model_key": layout.model_key(2),
        "selected": ["c1"],
        "created_at": 1.0,
        "deadline_at": 2e9,
        "train_config": {"task": "digits", "local_epochs": 2, "lr": 0.05, "batch_size": 16},
    }
    d.update(changes)
    return d


MALFORMED_ASSIGNMENTS: dict[str, bytes] = {
    "not JSON": b'{"round": 3',
    "not UTF-8": b"\xff\xfe\x00",
    "a list": b"[]",
    "deeply nested": b"[" * 200_000 + b"]" * 200_000,
    "too large": b" " * (4 * 1024 * 1024 + 1),
    "round is a boolean": json.dumps(_assignment(round=True)).encode(),
    "round is a string": json.dumps(_assignment(round="3")).encode(),
    "NaN deadline": json.dumps(_assignment(deadline_at=float("nan"))).encode(),
    "model elsewhere": json.dumps(_assignment(model_key="updates/x/round-1.safetensors")).encode(),
    "selected is a string": json.dumps(_assignment(selected="c1")).encode(),
    "no learning rate": json.dumps(
        _assignment(train_config={"local_epochs": 1, "batch_size": 16})
    ).encode(),
    "a billion epochs": json.dumps(
        _assignment(train_config={"local_epochs": 10**9, "lr": 0.1, "batch_size": 16})
    ).encode(),
}


def test_a_well_formed_assignment_parses() -> None:
    a = Assignment.from_json(json.dumps(_assignment()).encode())
    assert (a.round, a.base_version, a.selected) == (3, 2, frozenset({"c1"}))
    assert (a.train_config.local_epochs, a.train_config.lr, a.train_config.batch_size) == (
        2,
        0.05,
        16,
    )


@pytest.mark.parametrize("case", sorted(MALFORMED_ASSIGNMENTS))
def test_a_malformed_assignment_is_refused(case: str) -> None:
    with pytest.raises(AssignmentUnreadable):
        Assignment.from_json(MALFORMED_ASSIGNMENTS[case])


def test_polling_a_malformed_assignment_skips_it(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stack.clients.s3.put_object(
        Bucket=stack.names.models_bucket,
        Key=layout.ASSIGNMENT_KEY,
        Body=MALFORMED_ASSIGNMENTS["model elsewhere"],
    )
    client = EdgeClient(
        parse_settings([], _client_env(stack, "c1", tmp_path)), stack.clients, load_task("digits")
    )
    with caplog.at_level(logging.WARNING, logger="edge_client"):
        assert client.poll() is None
    assert "assignment skipped" in caplog.text


# --- AWS failures: named, retried, never fatal -----------------------------------------------


class StopAtFirstWait(threading.Event):
    """A stop signal that arrives while the client waits out its first back-off."""

    def wait(self, timeout: float | None = None) -> bool:
        self.set()
        return True


def test_a_failed_aws_call_is_logged_with_service_operation_and_code(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _device(stack, tmp_path)
    s3 = stack.aws.clients().s3
    stubber = Stubber(s3)
    stubber.add_client_error("get_object", service_error_code="InternalError", http_status_code=500)
    stubber.activate()
    stop = StopAtFirstWait()
    client = EdgeClient(
        client.settings, AwsClients(s3=s3, dynamodb=stack.clients.dynamodb), client.task, stop=stop
    )

    with caplog.at_level(logging.WARNING, logger="edge_client"):
        assert client.run() == 0

    assert "AWS call failed: s3 GetObject InternalError" in caplog.text


def test_a_refused_poll_is_no_round_yet_until_an_assignment_was_read(
    stack: Stack, tmp_path: Path
) -> None:
    """The device role may not list the models bucket: S3 answers the poll of an assignment
    not yet published with 403, not 404. Before the client has read one, that is "no round";
    after, the assignment is never absent, and a 403 is the error it is."""
    device = _device(stack, tmp_path)
    s3 = stack.aws.clients().s3
    client = EdgeClient(
        device.settings, AwsClients(s3=s3, dynamodb=stack.clients.dynamodb), device.task
    )
    with Stubber(s3) as stubber:
        stubber.add_client_error(
            "get_object", service_error_code="AccessDenied", http_status_code=403
        )
        assert client.poll() is None
    stack.clients.s3.put_object(
        Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY, Body=b"{}"
    )
    assert client.poll() is None  # read (and skipped: not an assignment)
    with Stubber(s3) as stubber:
        stubber.add_client_error(
            "get_object", service_error_code="AccessDenied", http_status_code=403
        )
        with pytest.raises(AwsCallFailed):
            client.poll()


def test_aws_call_names_connection_failures_by_their_class() -> None:
    from botocore.exceptions import EndpointConnectionError

    with pytest.raises(AwsCallFailed) as caught, aws_call("dynamodb", "UpdateItem"):
        raise EndpointConnectionError(endpoint_url="https://dynamodb.example")
    assert (caught.value.service, caught.value.operation, caught.value.code) == (
        "dynamodb",
        "UpdateItem",
        "EndpointConnectionError",
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _device_process(
    env: dict[str, str], log_path: Path, *args: str
) -> Iterator[subprocess.Popen[str]]:
    """``python -m edge_client ARGS`` as a device runs it, its output in ``log_path``."""
    with log_path.open("w") as log:
        yield subprocess.Popen(
            [sys.executable, "-m", "edge_client", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _wait_for(path: Path, text: str, proc: subprocess.Popen[str], seconds: float = 60) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never logged (exit {proc.poll()}):\n{path.read_text()}")


def test_device_process_waits_out_a_credential_outage_and_stops_on_sigterm(
    stack: Stack, tmp_path: Path
) -> None:
    write_client_splits(load_task("digits"), tmp_path, 1, "iid", seed=0, client_ids=["d1"])
    env = {
        **os.environ,
        **_client_env(stack, "d1", tmp_path / "d1"),
        # the token exchange service is not up (yet): nothing listens there
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"http://127.0.0.1:{_closed_port()}/creds",
    }
    log_path = tmp_path / "client.log"
    with _device_process(env, log_path) as proc:
        try:
            _wait_for(log_path, "AWS credentials unavailable", proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    output = log_path.read_text()
    assert proc.returncode == 0, output
    assert "client stopped" in output and "Traceback" not in output


def test_device_process_survives_a_malformed_global_model(stack: Stack, tmp_path: Path) -> None:
    write_client_splits(load_task("digits"), tmp_path, 1, "iid", seed=0, client_ids=["d2"])
    stack.clients.s3.put_object(
        Bucket=stack.names.models_bucket, Key=layout.model_key(0), Body=_bad_header(_state())
    )
    env = {**os.environ, **_client_env(stack, "d2", tmp_path / "d2")}
    log_path = tmp_path / "client.log"
    with _device_process(env, log_path, "--heartbeat-seconds", "1") as proc:
        try:
            deadline = time.time() + 60
            result = start_round(stack.clients, stack.names, stack.config)
            while not result.started and time.time() < deadline:
                time.sleep(0.3)
                result = start_round(stack.clients, stack.names, stack.config)
            assert result.started and result.selected == ("d2",)
            _wait_for(log_path, "global model refused", proc)
            assert proc.poll() is None  # still running after refusing it
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    output = log_path.read_text()
    assert proc.returncode == 0 and "client stopped" in output, output
    assert _updates(stack) == 0


def test_device_process_stops_within_the_nucleus_grace_while_a_call_hangs(
    stack: Stack, tmp_path: Path
) -> None:
    """Greengrass kills a component 5 s after SIGTERM; a call waiting on a silent network must
    not keep the client past that, nor make it exit with an error."""
    write_client_splits(load_task("digits"), tmp_path, 1, "iid", seed=0, client_ids=["d3"])
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(60)
        env = {
            **os.environ,
            **_client_env(stack, "d3", tmp_path / "d3"),
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
        }
        log_path = tmp_path / "client.log"
        with _device_process(env, log_path) as proc:
            try:
                connection, _ = silent.accept()  # the client's first call now waits for an answer
                with connection:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=5)  # the nucleus's grace (UnixExec)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                        pytest.fail(f"still running 5 s after SIGTERM:\n{log_path.read_text()}")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    output = log_path.read_text()
    assert proc.returncode == 0, output
    assert "client stopped" in output
