"""One round followed through X-Ray: the initiator that opened it and every averager
invocation that judged one of its updates carry the round's annotations, so
``annotation.round = N`` finds them all; local mode sends nothing.

The functions run as Lambda runs them, each in its own process with the environment Lambda
sets (``LAMBDA_TASK_ROOT``, ``_X_AMZN_TRACE_ID`` per invocation, ``AWS_XRAY_DAEMON_ADDRESS``):
the initiator from its bundled zip (what ``cdk deploy`` uploads), the averager from its
image's task root. The X-Ray SDK sends segments over UDP to the daemon address, where the
test listens in the daemon's place.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sfl.server.runtime import (
    CLIENT_ANNOTATION,
    EXPERIMENT_ANNOTATION,
    RESULT_ANNOTATION,
    ROUND_ANNOTATION,
)
from tests.conftest import TINY_MODEL, TRAINED, Stack

REPO = Path(__file__).resolve().parents[1]
RUNTIME = Path(__file__).with_name("lambda_runtime.py")
TICK = {"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon() -> Iterator[socket.socket]:
    """A UDP socket where the X-Ray daemon would listen."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[dict[str, Any]]:
    """Every entity (segment or subsegment, nested ones flattened) the SDK sent so far: each
    datagram is a JSON header line, then the entity's JSON document."""
    entities: list[dict[str, Any]] = []
    while True:
        try:
            datagram = sock.recv(65_536)
        except BlockingIOError:
            return entities
        header, _, body = datagram.decode().partition("\n")
        assert json.loads(header) == {"format": "json", "version": 1}
        todo = [json.loads(body)]
        while todo:
            entity = todo.pop()
            entities.append(entity)
            todo.extend(entity.get("subsegments", []))


def trace_header() -> tuple[str, str]:
    """A new trace's id and the header Lambda sets for a sampled invocation in it."""
    root = f"1-{int(time.time()):08x}-{secrets.token_hex(12)}"
    return root, f"Root={root};Parent={secrets.token_hex(8)};Sampled=1"


def run_function(
    stack: Stack,
    daemon: socket.socket,
    tmp_path: Path,
    *,
    name: str,
    task_root: Path,
    python_path: Path,
    events: list[dict[str, Any]],
    entry: str = "lambda_handler",
) -> tuple[list[str], list[Any]]:
    """Invoke a function once per event in a fresh process; returns each invocation's trace
    id and response."""
    traces, invocations = [], []
    for event in events:
        root, header = trace_header()
        traces.append(root)
        invocations.append({"event": event, "trace_header": header})
    (tmp_path / f"{name}-in.json").write_text(json.dumps(invocations))
    port = daemon.getsockname()[1]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(python_path),
        "PYTHONDONTWRITEBYTECODE": "1",
        **stack.env(),
        # What Lambda sets for a function with active tracing.
        "LAMBDA_TASK_ROOT": str(task_root),
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_XRAY_DAEMON_ADDRESS": f"127.0.0.1:{port}",
        "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
    }
    done = subprocess.run(
        [
            sys.executable,
            str(RUNTIME),
            str(task_root),
            entry,
            str(tmp_path / f"{name}-in.json"),
            str(tmp_path / f"{name}-out.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return traces, json.loads((tmp_path / f"{name}-out.json").read_text())


def initiator_zip(tmp_path: Path) -> Path:
    """The initiator's zip contents, bundled as synthesis bundles them."""
    from infra.bundling import bundle

    out = tmp_path / "initiator-zip"
    out.mkdir()
    bundle(
        handler=REPO / "lambdas" / "initiator" / "handler.py",
        requirements=REPO / "lambdas" / "initiator" / "requirements.txt",
        source_root=REPO,
        package="sfl",
        output_dir=out,
    )
    return out


def aws_calls(entities: list[dict[str, Any]], trace: str) -> set[tuple[str, str]]:
    """(service, operation) of the AWS calls recorded in a trace."""
    return {
        (e["name"], e["aws"]["operation"])
        for e in entities
        if e.get("trace_id") == trace and e.get("namespace") == "aws"
    }


def annotated(entities: list[dict[str, Any]], trace: str) -> list[dict[str, Any]]:
    return [
        e["annotations"] for e in entities if e.get("trace_id") == trace and e.get("annotations")
    ]


def test_one_round_is_found_by_its_annotation_from_initiator_to_averager(
    stack: Stack, daemon: socket.socket, tmp_path: Path
) -> None:
    stack.put_model(0, TINY_MODEL)
    stack.register("device-a", "device-b")

    # The schedule's tick: the initiator (from its zip) opens round 1 and writes the assignment.
    (opened,), (started,) = run_function(
        stack,
        daemon,
        tmp_path,
        name="sfl-initiator",
        task_root=initiator_zip(tmp_path),
        python_path=tmp_path / "initiator-zip",
        events=[TICK],
    )
    assert started["started"] is True and started["round"] == 1
    # The devices answer; each upload's S3 event is one averager invocation, its own trace.
    uploads = [stack.upload_update(c, 1, TRAINED) for c in ("device-a", "device-b")]
    judged, answers = run_function(
        stack,
        daemon,
        tmp_path,
        name="sfl-averager",
        task_root=REPO / "lambdas" / "averager",
        python_path=REPO,
        events=uploads,
    )
    assert [a["outcomes"][0]["result"] for a in answers] == ["accepted", "accepted"]
    assert answers[1]["outcomes"][0]["finished_round"] == 1

    entities = received(daemon)
    # X-Ray's `annotation.round = 1`: the traces with an entity annotated so.
    found = {e["trace_id"] for e in entities if e.get("annotations", {}).get("round") == 1}
    assert found == {opened, *judged}

    # The initiator's run: its handler's subsegment names the round and the experiment ...
    (run,) = [a for a in annotated(entities, opened) if a.get("Service") == "sfl-initiator"]
    assert run[ROUND_ANNOTATION] == 1 and run[EXPERIMENT_ANNOTATION] == stack.config.experiment
    # ... and its AWS calls are recorded in the same trace (boto3 patched).
    assert {("dynamodb", "Query"), ("s3", "PutObject")} <= aws_calls(entities, opened)
    # Each averager invocation: the update's subsegment names round, client and result.
    for trace, client in zip(judged, ("device-a", "device-b"), strict=True):
        (update,) = [a for a in annotated(entities, trace) if CLIENT_ANNOTATION in a]
        assert update == {
            EXPERIMENT_ANNOTATION: stack.config.experiment,
            ROUND_ANNOTATION: 1,
            CLIENT_ANNOTATION: client,
            RESULT_ANNOTATION: "accepted",
        }
        assert ("s3", "GetObject") in aws_calls(entities, trace)
    # Every subsegment hangs off the invocation's segment Lambda made (the header's Parent).
    assert all(e["type"] == "subsegment" for e in entities)


def test_local_mode_traces_nothing(
    stack: Stack, daemon: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process handlers (local mode, tests) keep the tracer off: no patching, no segment
    sent, even with a daemon address and a trace header in the environment."""
    import botocore.client
    import wrapt

    from sfl.local.lambdas import LocalFunction

    monkeypatch.setenv("AWS_XRAY_DAEMON_ADDRESS", f"127.0.0.1:{daemon.getsockname()[1]}")
    monkeypatch.setenv("_X_AMZN_TRACE_ID", trace_header()[1])
    stack.put_model(0, TINY_MODEL)
    stack.register("device-a")
    initiator, averager = LocalFunction("initiator"), LocalFunction("averager")
    assert initiator.invoke(TICK)["round"] == 1
    answer = averager.invoke(stack.upload_update("device-a", 1, TRAINED))
    assert answer["outcomes"][0]["finished_round"] == 1

    assert initiator.module.tracer.disabled and averager.module.tracer.disabled
    # The X-Ray SDK's patch replaces botocore's call with a wrapt proxy.
    call = botocore.client.BaseClient.__dict__["_make_api_call"]
    assert not isinstance(call, wrapt.FunctionWrapper)
    assert received(daemon) == []
