"""Calling the real Lambda handlers in-process, as the Lambda service would."""

from __future__ import annotations

import importlib.util
import logging
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sfl.server.shards import Invoker, Shard

logger = logging.getLogger(__name__)

LAMBDAS_DIR = Path(__file__).resolve().parents[2] / "lambdas"


@dataclass
class LocalContext:
    """The parts of Lambda's context object that Powertools reads."""

    function_name: str
    memory_limit_in_mb: int = 1024
    aws_request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def load_handler(name: str) -> ModuleType:
    """Import ``lambdas/<name>/handler.py`` under a unique module name."""
    module_name = f"sfl_lambda_{name}_handler"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = LAMBDAS_DIR / name / "handler.py"
    if not path.exists():
        raise FileNotFoundError(f"no handler at {path} (local mode runs from a source checkout)")
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    if name == "averager":  # sums a large round's shards by calling its own shard handler
        setattr(module, "shard_invoker", lambda: in_process_shard_invoker(module))  # noqa: B010
    return module


def in_process_shard_invoker(module: ModuleType) -> Invoker:
    """The averager handler ``module``'s shard function called in-process, as the averager
    invokes the deployed one: synchronously, the handler's exception reaching the caller."""

    def invoke(shard: Shard) -> Any:
        return module.shard_handler(shard.to_event(), LocalContext("averager-shard"))

    return invoke


def local_shard_invoker() -> Invoker:
    """Local mode's shard invoker: the averager handler's shard function, in-process."""
    return in_process_shard_invoker(load_handler("averager"))


class LocalFunction:
    """A handler invoked in-process, many at once, like one Lambda function."""

    def __init__(self, name: str, *, log_path: Path | None = None) -> None:
        """``log_path``: append the handler's JSON log lines there instead of stdout."""
        self.name = name
        self.module = load_handler(name)
        self.scheduled_failures = 0
        self.last_scheduled_error = ""
        # Powertools warns when an invocation adds no metric (ticks, duplicates); locally
        # metrics are disabled anyway.
        warnings.filterwarnings("ignore", message="No application metrics to publish")
        if log_path is not None:
            stream = log_path.open("a", encoding="utf-8")
            handler = self.module.logger.registered_handler
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(stream)

    def invoke(self, event: dict[str, Any]) -> Any:
        """A synchronous invocation: the handler's exception reaches the caller."""
        try:
            return self.module.lambda_handler(event, LocalContext(self.name))
        finally:
            # Metrics are disabled locally; drop what Powertools would otherwise buffer.
            self.module.metrics.clear_metrics()

    def invoke_scheduled(self, event: dict[str, Any]) -> bool:
        """An asynchronous invocation, as EventBridge makes on a schedule: a failure is
        logged and counted (``scheduled_failures``, ``last_scheduled_error``), never raised.
        Lambda would retry it up to twice; locally the next scheduled invocation is the retry.
        Returns whether the handler succeeded."""
        try:
            self.invoke(event)
        except Exception as error:
            self.scheduled_failures += 1
            self.last_scheduled_error = f"{type(error).__name__}: {error}"
            logger.exception("scheduled invocation of %s failed; the next one retries", self.name)
            return False
        return True
