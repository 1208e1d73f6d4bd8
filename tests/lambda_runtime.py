"""Plays the Lambda runtime for one function, in a process of its own as Lambda runs it.

``python lambda_runtime.py TASK_ROOT ENTRY INVOCATIONS RESULTS``: imports ``handler`` from
TASK_ROOT (the function's code as deployed: the initiator's bundled zip, the averager image's
task root), then for each invocation in the JSON file INVOCATIONS (``{"event": ...,
"trace_header": "Root=...;Parent=...;Sampled=1"}``) sets ``_X_AMZN_TRACE_ID`` as the runtime
does before each invoke and calls ``handler.ENTRY(event, context)``; the responses go to the
JSON file RESULTS. The caller sets the rest of the environment Lambda sets
(``LAMBDA_TASK_ROOT``, ``AWS_LAMBDA_FUNCTION_NAME``, ``AWS_XRAY_DAEMON_ADDRESS``, ...).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

# The variable the Lambda runtime sets to each invocation's trace header.
TRACE_HEADER_VARIABLE = "_X_AMZN_TRACE_ID"


class InvocationContext:
    """The parts of Lambda's context object the handlers (and Powertools) read."""

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name
        self.memory_limit_in_mb = 1024
        self.aws_request_id = str(uuid.uuid4())
        self.invoked_function_arn = (
            f"arn:aws:lambda:us-east-1:000000000000:function:{function_name}"
        )

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def main(task_root: str, entry: str, invocations: str, results: str) -> None:
    sys.path.insert(0, task_root)
    handler = importlib.import_module("handler")
    function = getattr(handler, entry)
    answers: list[Any] = []
    for invocation in json.loads(Path(invocations).read_text()):
        os.environ[TRACE_HEADER_VARIABLE] = invocation["trace_header"]
        context = InvocationContext(os.environ["AWS_LAMBDA_FUNCTION_NAME"])
        answers.append(function(invocation["event"], context))
    Path(results).write_text(json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:])
