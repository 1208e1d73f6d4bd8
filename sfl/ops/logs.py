"""The functions' log lines about a round or a device, for ``sfl logs``: from CloudWatch Logs
on AWS (the two log groups the stack outputs, filtered there by the JSON fields Powertools
writes), from the log file ``sfl local up`` writes in local mode. The same fields either way:
``round`` and ``client_id`` are on every line about them."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from sfl.core.layout import CLIENT_ID
from sfl.ops import local_endpoint
from sfl.ops.federation import Federation, OpsError, call

#: How Powertools' logger writes a line's time.
POWERTOOLS_TIME = "%Y-%m-%d %H:%M:%S,%f%z"
#: The stack outputs naming the functions' log groups.
LOG_GROUP_OUTPUTS = ("InitiatorLogGroupName", "AveragerLogGroupName")


def matches(line: dict[str, Any], round_: int | None, client: str | None) -> bool:
    if round_ is not None and line.get("round") != round_:
        return False
    return client is None or line.get("client_id") == client


def filter_pattern(round_: int | None, client: str | None) -> str:
    """CloudWatch Logs' JSON filter for the same selection as ``matches``."""
    terms = []
    if round_ is not None:
        terms.append(f"$.round = {int(round_)}")
    if client is not None:
        terms.append(f'$.client_id = "{client}"')
    return "{ " + " && ".join(terms) + " }" if terms else ""


def read_logs(
    fed: Federation,
    *,
    round_: int | None = None,
    client: str | None = None,
    since_seconds: float = 86_400.0,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """The first ``limit`` matching lines of the last ``since_seconds``, in time order (as
    CloudWatch Logs reads them: narrow with the round, the device or the time to see more)."""
    if client is not None and not CLIENT_ID.match(client):
        raise OpsError(f"{client!r} is not a client id (letters, digits, ':', '_', '-')")
    since = time.time() - since_seconds
    if fed.local:
        found = _local(fed, round_, client, since)
    else:
        found = _cloudwatch(fed, round_, client, since, limit)
    return found[:limit]


def _local(
    fed: Federation, round_: int | None, client: str | None, since: float
) -> list[dict[str, Any]]:
    record = local_endpoint.recorded()
    if record is None or not record.log_path or record.endpoint_url != fed.endpoint_url:
        raise OpsError(
            "this local federation's log file is not known: 'sfl local up' writes it to "
            "<--out>/lambda-logs.jsonl"
        )
    return [
        line
        for line in _lines(Path(record.log_path))
        if matches(line, round_, client) and _written_at(line) >= since
    ]


def _written_at(line: dict[str, Any]) -> float:
    """A Powertools line's time (``2026-12-07 15:44:21,270+0000``); 0 if it has none."""
    try:
        return dt.datetime.strptime(str(line.get("timestamp")), POWERTOOLS_TIME).timestamp()
    except ValueError:
        return 0.0


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with path.open() as f:
            for text in f:
                try:
                    line = json.loads(text)
                except ValueError:
                    continue  # a line cut short while being written
                if isinstance(line, dict):
                    yield line
    except FileNotFoundError as e:
        raise OpsError(f"no log file at {path} yet") from e


def _cloudwatch(
    fed: Federation, round_: int | None, client: str | None, since: float, limit: int
) -> list[dict[str, Any]]:
    logs = fed.client("logs")
    found: list[dict[str, Any]] = []
    for output in LOG_GROUP_OUTPUTS:
        group = fed.outputs.get(output)
        if not group:
            continue
        kwargs: dict[str, Any] = {
            "logGroupName": group,
            "startTime": int(since * 1000),
            "filterPattern": filter_pattern(round_, client),
        }
        read = 0
        while read < limit:
            page = call("logs", "FilterLogEvents", partial(logs.filter_log_events, **kwargs))
            for event in page.get("events", []):
                try:
                    line = json.loads(event["message"])
                except ValueError:
                    line = {"message": event["message"].rstrip()}
                # CloudWatch has filtered already; the same test here keeps an emulator
                # that ignores JSON patterns (moto's) from showing more.
                if isinstance(line, dict) and matches(line, round_, client):
                    line.setdefault("timestamp", event.get("timestamp"))
                    found.append(line)
                    read += 1
            if not page.get("nextToken"):
                break
            kwargs["nextToken"] = page["nextToken"]
    return sorted(found, key=lambda line: str(line.get("timestamp", "")))
