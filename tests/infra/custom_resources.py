"""CloudFormation's side of a Lambda-backed custom resource, played for the deploy rehearsal:
the request CloudFormation sends (``RequestType``, the resolved properties as strings, a
``ResponseURL``), the function's own code run from its synthesized asset in its runtime, and
the answer read back where CloudFormation would wait for it.

The code is the asset the template deploys, unchanged: CDK's inline Python (S3 bucket
notifications), CDK's bundled Node.js handlers (S3 auto-delete objects, AwsCustomResource),
our destroy clean-up. It runs as the Lambda runtime runs it: a Python process with boto3, or
Node.js with the AWS SDK v3 clients the runtime provides (the repository's ``node_modules``,
pinned in package.json, stand in for the runtime's), with the function's environment and the
local endpoint's. CloudFormation's ResponseURL is a pre-signed HTTPS URL on S3; here it is an
HTTP server the test runs. CDK's Node.js handlers PUT with ``https.request`` to the URL's host
and path alone (port 443), so the Node.js runtime below connects that host to the stand-in's
port: the network's routing, not the handler's code, is what differs.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stack_template import REPO_ROOT

#: Where the Node.js runtime's AWS SDK comes from (``npm ci`` installs the pinned clients).
NODE_MODULES = REPO_ROOT / "node_modules"

# The Lambda runtime's bootstrap, for Python: load the handler's module from the code folder,
# call it with the event and a context, as the runtime does.
_PYTHON_RUNTIME = """
import importlib, json, logging, sys
logging.basicConfig(format="[%(levelname)s] %(message)s")  # the runtime's log handler
code, handler, event = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, code)
module, function = handler.rsplit(".", 1)

class Context:
    function_name = sys.argv[4]
    log_stream_name = "2026/12/07/[$LATEST]local"
    aws_request_id = event["RequestId"]
    memory_limit_in_mb = 128

    def get_remaining_time_in_millis(self):
        return 60_000

getattr(importlib.import_module(module), function)(event, Context())
"""

# The same for Node.js; the ResponseURL's host is reached at the stand-in's port over plain
# HTTP (CloudFormation's URL is HTTPS on 443; the handler names host and path only).
_NODE_RUNTIME = """
const https = require("https"), net = require("net"), path = require("path");
const [code, handler, eventJson, functionName] = process.argv.slice(1);
const event = JSON.parse(eventJson);
const response = new URL(event.ResponseURL);
const connect = https.globalAgent.createConnection;
https.globalAgent.createConnection = function (options, callback) {
  if (options.host === response.hostname) {
    return net.connect(Number(response.port), response.hostname);
  }
  return connect.call(this, options, callback);
};
const [file, name] = [handler.slice(0, handler.lastIndexOf(".")),
                      handler.slice(handler.lastIndexOf(".") + 1)];
const context = {
  functionName, logStreamName: "2026/12/07/[$LATEST]local", awsRequestId: event.RequestId,
  getRemainingTimeInMillis: () => 60000,
};
Promise.resolve(require(path.join(code, file))[name](event, context)).then(
  () => process.exit(0),
  (error) => { console.error(error); process.exit(1); },
);
"""


@dataclass(frozen=True)
class FunctionCode:
    """What a custom resource's ServiceToken names: a function's code, runtime and
    environment, as the template deploys it."""

    name: str  # the deployed function's name
    runtime: str  # e.g. python3.13, nodejs24.x
    handler: str  # module.function, as in the template
    code: Path  # the folder the runtime loads the handler from
    environment: dict[str, str]
    timeout: int


@dataclass(frozen=True)
class Answer:
    """What the handler PUT to the ResponseURL."""

    status: str
    reason: str
    physical_id: str
    data: dict[str, Any]
    logs: str  # the function's output, for messages


def as_sent(value: Any) -> Any:
    """Property values as CloudFormation hands them to a custom resource: scalars as strings."""
    if isinstance(value, dict):
        return {k: as_sent(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_sent(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


@contextmanager
def code_folder(function: dict[str, Any], assembly_dir: Path) -> Iterator[Path]:
    """The folder a function's code is in: its cdk.out asset (what the bootstrap bucket got
    zipped), or, for an inline ``ZipFile``, a folder holding it as ``index.py``/``index.js``."""
    code = function["Properties"]["Code"]
    if "ZipFile" in code:
        runtime = function["Properties"]["Runtime"]
        suffix = ".py" if runtime.startswith("python") else ".js"
        with tempfile.TemporaryDirectory(prefix="inline-code-") as folder:
            (Path(folder) / f"index{suffix}").write_text(code["ZipFile"])
            yield Path(folder)
        return
    key = str(code["S3Key"])
    yield assembly_dir / f"asset.{key.removesuffix('.zip')}"


@contextmanager
def response_url() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in for the pre-signed S3 URL CloudFormation waits on; keeps each answer."""
    answers: list[dict[str, Any]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            length = int(self.headers["Content-Length"])
            answers.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/cloudformation-response", answers
    finally:
        server.shutdown()
        server.server_close()


def invoke(function: FunctionCode, event: dict[str, Any], endpoint_env: dict[str, str]) -> Answer:
    """Run the function on ``event`` (its ResponseURL is filled in here) and return the answer
    it sent CloudFormation; a handler that answers nothing fails the test (CloudFormation
    would wait an hour)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_LAMBDA_FUNCTION_NAME": function.name,
        **function.environment,
        **endpoint_env,
    }
    with response_url() as (url, answers):
        sent = {**event, "ResponseURL": url}
        if function.runtime.startswith("python"):
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the asset as synthesized
            command = [sys.executable, "-c", _PYTHON_RUNTIME]
        elif function.runtime.startswith("nodejs"):
            node = shutil.which("node")
            assert node is not None, "Node.js runs CDK's own handlers: install it"
            assert (NODE_MODULES / "@aws-sdk").is_dir(), "npm ci installs the runtime's SDK"
            env["NODE_PATH"] = str(NODE_MODULES)
            command = [node, "-e", _NODE_RUNTIME]
        else:
            raise AssertionError(f"no local runtime for {function.runtime}")
        result = subprocess.run(
            [*command, str(function.code), function.handler, json.dumps(sent), function.name],
            cwd=function.code,
            env=env,
            capture_output=True,
            text=True,
            timeout=min(function.timeout, 120),
            check=False,
        )
        logs = result.stdout + result.stderr
        assert len(answers) == 1, f"{function.name} answered {len(answers)} times:\n{logs[-4000:]}"
    (answer,) = answers
    assert (answer["RequestId"], answer["LogicalResourceId"], answer["StackId"]) == (
        event["RequestId"],
        event["LogicalResourceId"],
        event["StackId"],
    ), answer
    return Answer(
        status=str(answer["Status"]),
        reason=str(answer.get("Reason", "")),
        physical_id=str(answer["PhysicalResourceId"]),
        data=dict(answer.get("Data") or {}),
        logs=logs,
    )


def cloudformation_request(
    request_type: str,
    *,
    stack_id: str,
    logical_id: str,
    resource_type: str,
    service_token: str,
    properties: dict[str, Any],
    physical_id: str | None = None,
) -> dict[str, Any]:
    """The event CloudFormation sends a custom resource's function (its ResponseURL is set
    where it is invoked)."""
    event: dict[str, Any] = {
        "RequestType": request_type,
        "ServiceToken": service_token,
        "StackId": stack_id,
        "RequestId": str(uuid.uuid4()),
        "LogicalResourceId": logical_id,
        "ResourceType": resource_type,
        "ResourceProperties": as_sent(properties),
    }
    if physical_id is not None:
        event["PhysicalResourceId"] = physical_id
    return event
