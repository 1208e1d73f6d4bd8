"""What Greengrass reports of each device, for ``sfl devices``: the core device's health and
the edge client component's lifecycle state, version and last error.

A device's client id is its core device's thing name (the component's client reads
``AWS_IOT_THING_NAME``; the device's policies pin its registry item and update prefix to it),
and the stack names its component in the output ``ComponentName``. Per device, one
``GetCoreDevice`` and ``ListInstalledComponents`` pages (all topologies, until the component is
found, at most ``MAX_PAGES``), for at most ``MAX_DEVICES`` devices a look, a few at a time.
Throttling is retried by the client's standard retry mode; what still fails is that device's
``unknown``, with the reason, never the command's failure. Local mode has no Greengrass.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sfl.core.layout import CLIENT_ID
from sfl.ops.federation import Federation
from sfl.state.aws import error_code

#: The stack outputs naming the edge client's component and the version it deploys.
COMPONENT_OUTPUT = "ComponentName"
COMPONENT_VERSION_OUTPUT = "ComponentVersion"
#: Devices one look reads Greengrass for (two requests or more each); name others with
#: ``sfl devices --device``.
MAX_DEVICES = 100
#: Requests in flight at once: a look over ``MAX_DEVICES`` takes seconds, not minutes.
WORKERS = 4
#: ``ListInstalledComponents`` pages (of ``PAGE_SIZE``) read per device before giving up.
MAX_PAGES = 5
PAGE_SIZE = 100
#: Bounds on what is shown of Greengrass's strings (its model allows 1,000-character details
#: and any number of status codes).
DETAILS_CHARS = 240
MAX_STATUS_CODES = 8
CODE_CHARS = 64
WORD_CHARS = 64


class Reading(StrEnum):
    """What is known of a device's Greengrass side."""

    REPORTED = "reported"  # Greengrass answered: the fields below are what it last heard
    NO_CORE_DEVICE = "none"  # no core device by that thing name (a client run elsewhere)
    UNKNOWN = "unknown"  # a read failed; ``reason`` says why
    NOT_READ = "not read"  # past ``MAX_DEVICES``, or asked not to
    LOCAL = "local"  # local mode: there is no Greengrass


@dataclass(frozen=True)
class ComponentState:
    """One device as Greengrass last heard of it (times in seconds since the epoch)."""

    reading: Reading
    reason: str | None = None
    core_status: str | None = None  # HEALTHY / UNHEALTHY
    core_status_at: float | None = None
    component: str | None = None
    component_version: str | None = None  # None: not installed on this core device
    component_current: bool | None = None  # the version the stack deploys?
    lifecycle_state: str | None = None  # NEW ... RUNNING, ERRORED, BROKEN, FINISHED
    lifecycle_details: str | None = None
    status_codes: list[str] = field(default_factory=list)
    state_changed_at: float | None = None
    reported_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"reading": self.reading.value}


def component_states(
    fed: Federation, client_ids: Iterable[str], *, read: bool = True
) -> dict[str, ComponentState]:
    """Each client's Greengrass side: ``local`` in local mode, ``not read`` past
    ``MAX_DEVICES`` (or with ``read=False``), else what Greengrass reports."""
    ids = list(client_ids)
    if fed.local:
        return {c: ComponentState(Reading.LOCAL) for c in ids}
    if not read:
        return {c: ComponentState(Reading.NOT_READ, "not asked") for c in ids}
    skipped = {
        c: ComponentState(
            Reading.NOT_READ,
            f"past the first {MAX_DEVICES} devices of a look: name them with --device",
        )
        for c in ids[MAX_DEVICES:]
    }
    component = fed.outputs.get(COMPONENT_OUTPUT)
    if not component:
        missing = ComponentState(
            Reading.UNKNOWN, f"stack {fed.stack!r} has no output {COMPONENT_OUTPUT}: redeploy it"
        )
        return {c: missing for c in ids[:MAX_DEVICES]} | skipped
    greengrass = fed.client("greengrassv2")
    deployed = fed.outputs.get(COMPONENT_VERSION_OUTPUT) or None
    states = read_states(greengrass, ids[:MAX_DEVICES], component, deployed, workers=WORKERS)
    return states | skipped


def read_states(
    greengrass: Any,
    thing_names: list[str],
    component: str,
    deployed_version: str | None = None,
    *,
    workers: int = WORKERS,
) -> dict[str, ComponentState]:
    """``read_state`` for each thing name, ``workers`` at a time (boto3 clients are
    thread-safe); the result keeps their order."""

    def one(name: str) -> ComponentState:
        return read_state(greengrass, name, component, deployed_version)

    if workers <= 1 or len(thing_names) <= 1:
        return {name: one(name) for name in thing_names}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="greengrass") as pool:
        return dict(zip(thing_names, pool.map(one, thing_names), strict=True))


def read_state(
    greengrass: Any, thing_name: str, component: str, deployed_version: str | None = None
) -> ComponentState:
    """One core device's health and its ``component``; any failure is ``unknown`` with the
    operation and error code, never raised."""
    if not CLIENT_ID.match(thing_name):  # the registry checks it too; the URI must not vary
        return ComponentState(Reading.UNKNOWN, "not a thing name", component=component)
    try:
        core = greengrass.get_core_device(coreDeviceThingName=thing_name)
    except ClientError as e:
        if error_code(e) == "ResourceNotFoundException":
            return ComponentState(
                Reading.NO_CORE_DEVICE, "no Greengrass core device by this name",
                component=component,
            )  # fmt: skip
        return ComponentState(Reading.UNKNOWN, _failure("GetCoreDevice", e), component=component)
    except BotoCoreError as e:
        return ComponentState(Reading.UNKNOWN, _failure("GetCoreDevice", e), component=component)
    health = ComponentState(
        Reading.REPORTED,
        core_status=_word(core.get("status")),
        core_status_at=_seconds(core.get("lastStatusUpdateTimestamp")),
        component=component,
    )
    try:
        installed = _find_component(greengrass, thing_name, component)
    except (ClientError, BotoCoreError) as e:
        return replace(
            health, reading=Reading.UNKNOWN, reason=_failure("ListInstalledComponents", e)
        )
    except _TooManyComponents:
        reason = f"not among its first {MAX_PAGES * PAGE_SIZE} installed components"
        return replace(health, reading=Reading.UNKNOWN, reason=reason)
    if installed is None:
        return replace(health, reason="not installed on this core device")
    version = _word(installed.get("componentVersion"))
    return replace(
        health,
        component_version=version,
        component_current=None if deployed_version is None else version == deployed_version,
        lifecycle_state=_word(installed.get("lifecycleState")),
        lifecycle_details=_bounded(installed.get("lifecycleStateDetails"), DETAILS_CHARS),
        status_codes=_codes(installed.get("lifecycleStatusCodes")),
        state_changed_at=_seconds(installed.get("lastStatusChangeTimestamp")),
        reported_at=_seconds(installed.get("lastReportedTimestamp")),
    )


def _find_component(greengrass: Any, thing_name: str, component: str) -> dict[str, Any] | None:
    """The component's entry among the core device's installed components, root or not."""
    kwargs: dict[str, Any] = {
        "coreDeviceThingName": thing_name,
        "topologyFilter": "ALL",
        "maxResults": PAGE_SIZE,
    }
    for _ in range(MAX_PAGES):
        page = greengrass.list_installed_components(**kwargs)
        for entry in page.get("installedComponents", []):
            if entry.get("componentName") == component:
                return dict(entry)
        token = page.get("nextToken")
        if not token:
            return None
        kwargs["nextToken"] = token
    raise _TooManyComponents


class _TooManyComponents(Exception):
    """``MAX_PAGES`` pages read and more to come: the read stops, the answer is unknown."""


def _codes(value: Any) -> list[str]:
    codes = value[:MAX_STATUS_CODES] if isinstance(value, list) else []
    return [code for code in (_bounded(c, CODE_CHARS) for c in codes) if code]


def _failure(operation: str, error: ClientError | BotoCoreError) -> str:
    code = error_code(error) if isinstance(error, ClientError) else type(error).__name__
    if code in {"AccessDenied", "AccessDeniedException"}:
        return f"access denied to greengrass:{operation}"
    return _bounded(f"{operation}: {code}: {error}", DETAILS_CHARS) or operation


def _word(value: Any) -> str | None:
    return _bounded(value, WORD_CHARS)


def _bounded(value: Any, chars: int) -> str | None:
    """A string of at most ``chars`` printable characters (others become spaces), or None."""
    if not isinstance(value, str) or not value:
        return None
    text = "".join(ch if ch.isprintable() else " " for ch in value[: chars + 1])
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _seconds(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, dt.datetime) else None
