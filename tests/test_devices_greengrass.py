"""``sfl devices`` shows what Greengrass reports of each device: the core device's health and
the edge client component's version, lifecycle state and last error.

moto has no Greengrass V2 API, so the Greengrass side is played by botocore's own ``Stubber``
on a real boto3 ``greengrassv2`` client: it checks every request's parameters and every
response against the service model botocore ships (names, types, enums, required members),
and the response bodies below are written from the documented shapes (API reference,
``ListInstalledComponents`` / ``GetCoreDevice``). Throttling that botocore's standard retry
mode absorbs is played one level lower, as HTTP responses, so the real retry handler runs.
The command end to end runs against the local endpoint (moto over HTTP): local mode shows
``local``, a deployed stack (the same stack without the local marker) the stubbed states.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse, HeadersDict
from botocore.stub import Stubber
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from sfl.cli import operator
from sfl.cli.main import main
from sfl.ops import greengrass
from sfl.ops.federation import LOCAL_OUTPUT, Federation
from sfl.ops.greengrass import ComponentState, Reading, read_state, read_states
from sfl.state.aws import RETRY_CONFIG
from tests.test_operator_reads import DEVICES, Reachable, federation  # noqa: F401 (fixture)

COMPONENT = "Sfl.EdgeClient"
DEPLOYED = "1.0.7"
THING = "plant-3-press"
CHANGED = dt.datetime(2026, 12, 7, 20, 15, tzinfo=dt.UTC)
REPORTED = dt.datetime(2026, 12, 7, 21, 0, tzinfo=dt.UTC)
JSON = HeadersDict({"Content-Type": "application/json"})


def greengrass_client() -> Any:
    """A real client for a real region (never called: the stubber or the test answers)."""
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="eu-west-1"
    ).client("greengrassv2", config=RETRY_CONFIG)


@pytest.fixture
def stubbed() -> Iterator[tuple[Any, Stubber]]:
    client = greengrass_client()
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def core_device(status: str = "HEALTHY") -> dict[str, Any]:
    """``GetCoreDevice``'s answer, as the API reference documents it."""
    return {
        "coreDeviceThingName": THING,
        "coreVersion": "2.14.3",
        "platform": "linux",
        "architecture": "aarch64",
        "runtime": "aws_nucleus_classic",
        "status": status,
        "lastStatusUpdateTimestamp": REPORTED,
        "tags": {"federation": "Sfl-Federation"},
    }


def installed(name: str, version: str, state: str, **more: Any) -> dict[str, Any]:
    """One ``InstalledComponent``."""
    return {
        "componentName": name,
        "componentVersion": version,
        "lifecycleState": state,
        "isRoot": name == COMPONENT,
        "lastStatusChangeTimestamp": CHANGED,
        "lastReportedTimestamp": REPORTED,
        "lastInstallationSource": "7d4a8a8c-6a0e-4d0b-9d7f-0f3f2b6c1e21",
        **more,
    }


def expect_pages(
    stubber: Stubber, *pages: list[dict[str, Any]], thing: str = THING, more: bool = False
) -> None:
    """``ListInstalledComponents`` answering ``pages`` in turn, each asked with the token
    the one before gave (the last one gives a token too with ``more``)."""
    for number, page in enumerate(pages):
        request: dict[str, Any] = {
            "coreDeviceThingName": thing,
            "topologyFilter": "ALL",
            "maxResults": greengrass.PAGE_SIZE,
        }
        if number:
            request["nextToken"] = f"page-{number}"
        response: dict[str, Any] = {"installedComponents": page}
        if more or number < len(pages) - 1:
            response["nextToken"] = f"page-{number + 1}"
        stubber.add_response("list_installed_components", response, request)


def expect_device(stubber: Stubber, thing: str, status: str, *components: dict[str, Any]) -> None:
    """``GetCoreDevice`` then one page of installed components, for ``thing``."""
    answer = core_device(status) | {"coreDeviceThingName": thing}
    stubber.add_response("get_core_device", answer, {"coreDeviceThingName": thing})
    expect_pages(stubber, list(components), thing=thing)


def test_a_running_component_is_found_on_the_second_page(
    stubbed: tuple[Any, Stubber],
) -> None:
    client, stubber = stubbed
    stubber.add_response("get_core_device", core_device(), {"coreDeviceThingName": THING})
    expect_pages(
        stubber,
        [
            installed("aws.greengrass.Nucleus", "2.14.3", "FINISHED"),
            installed("aws.greengrass.TokenExchangeService", "2.0.3", "RUNNING"),
        ],
        [installed(COMPONENT, DEPLOYED, "RUNNING")],
    )
    state = read_state(client, THING, COMPONENT, DEPLOYED)
    assert state == ComponentState(
        Reading.REPORTED,
        core_status="HEALTHY",
        core_status_at=REPORTED.timestamp(),
        component=COMPONENT,
        component_version=DEPLOYED,
        component_current=True,
        lifecycle_state="RUNNING",
        state_changed_at=CHANGED.timestamp(),
        reported_at=REPORTED.timestamp(),
    )


def test_an_errored_component_shows_its_status_codes_and_details(
    stubbed: tuple[Any, Stubber],
) -> None:
    client, stubber = stubbed
    stubber.add_response(
        "get_core_device", core_device("UNHEALTHY"), {"coreDeviceThingName": THING}
    )
    details = "Install script exited with code 1: No matching distribution found for torch"
    expect_pages(
        stubber,
        [
            installed(
                COMPONENT, "1.0.6", "ERRORED",
                lifecycleStateDetails=details,
                lifecycleStatusCodes=["INSTALL_ERROR"],
            )
        ],
    )  # fmt: skip
    state = read_state(client, THING, COMPONENT, DEPLOYED)
    assert (state.reading, state.core_status, state.lifecycle_state) == (
        Reading.REPORTED,
        "UNHEALTHY",
        "ERRORED",
    )
    assert state.status_codes == ["INSTALL_ERROR"] and state.lifecycle_details == details
    assert state.component_version == "1.0.6" and state.component_current is False
    row = state.to_dict()
    assert row["reading"] == "reported" and row["status_codes"] == ["INSTALL_ERROR"]
    json.dumps(row)  # what --json prints


def test_a_core_device_without_the_component_says_so(stubbed: tuple[Any, Stubber]) -> None:
    client, stubber = stubbed
    stubber.add_response("get_core_device", core_device(), {"coreDeviceThingName": THING})
    expect_pages(stubber, [installed("aws.greengrass.Nucleus", "2.14.3", "FINISHED")])
    state = read_state(client, THING, COMPONENT)
    assert state.reading is Reading.REPORTED and state.component_version is None
    assert state.reason == "not installed on this core device"


def test_a_client_that_is_no_core_device_reads_none(stubbed: tuple[Any, Stubber]) -> None:
    client, stubber = stubbed
    stubber.add_client_error(
        "get_core_device",
        service_error_code="ResourceNotFoundException",
        service_message=f"Core device {THING} not found",
        http_status_code=404,
        expected_params={"coreDeviceThingName": THING},
    )
    state = read_state(client, THING, COMPONENT)
    assert state.reading is Reading.NO_CORE_DEVICE and state.reason


@pytest.mark.parametrize(
    ("operation", "code", "status", "said"),
    [
        ("get_core_device", "ThrottlingException", 429, "GetCoreDevice: ThrottlingException"),
        ("get_core_device", "AccessDeniedException", 403, "access denied to greengrass:GetCore"),
        ("list_installed_components", "InternalServerException", 500, "ListInstalledComponents"),
    ],
)
def test_a_failed_read_is_that_device_unknown_with_the_reason(
    stubbed: tuple[Any, Stubber], operation: str, code: str, status: int, said: str
) -> None:
    """What is still failing once botocore's retries are spent (the stubber answers before
    the retry handler, so this is the last answer of them)."""
    client, stubber = stubbed
    if operation == "list_installed_components":
        stubber.add_response("get_core_device", core_device(), {"coreDeviceThingName": THING})
    stubber.add_client_error(operation, service_error_code=code, http_status_code=status)
    state = read_state(client, THING, COMPONENT)
    assert state.reading is Reading.UNKNOWN and state.reason is not None
    assert said in state.reason


def test_throttling_is_retried_by_the_standard_retry_mode() -> None:
    """Two throttled answers (HTTP 429, rest-json's error header), then the answer: the
    device reads as reported, after three requests of the same operation."""
    client = greengrass_client()
    sent: list[str] = []
    throttled = 2

    def answer(request: Any, **_: Any) -> AWSResponse:
        sent.append(request.url.split("?")[0].rsplit("/", 1)[-1])
        if len(sent) <= throttled:
            return AWSResponse(
                request.url,
                429,
                HeadersDict(
                    {"x-amzn-ErrorType": "ThrottlingException", "Content-Type": "application/json"}
                ),
                _Raw(b'{"message": "Rate exceeded"}'),
            )
        if request.url.split("?")[0].endswith(THING):
            body = json.dumps(core_device() | {"lastStatusUpdateTimestamp": 1.7e9}).encode()
        else:
            page = installed(COMPONENT, DEPLOYED, "RUNNING")
            page |= {"lastStatusChangeTimestamp": 1.7e9, "lastReportedTimestamp": 1.7e9}
            body = json.dumps({"installedComponents": [page]}).encode()
        return AWSResponse(request.url, 200, JSON, _Raw(body))

    errors: list[str] = []

    def parsed(response: Any, **_: Any) -> None:
        if response is not None and "Error" in response[1]:
            errors.append(response[1]["Error"]["Code"])

    client.meta.events.register("before-send.greengrassv2", answer)
    client.meta.events.register("needs-retry.greengrassv2", parsed)
    state = read_state(client, THING, COMPONENT, DEPLOYED)
    assert state.reading is Reading.REPORTED and state.lifecycle_state == "RUNNING"
    assert sent == [THING, THING, THING, "installedComponents"]
    assert errors == ["ThrottlingException"] * throttled


class _Raw(io.BytesIO):
    """The raw body botocore streams a response from."""

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.getvalue()


def test_pages_are_bounded(stubbed: tuple[Any, Stubber], monkeypatch: pytest.MonkeyPatch) -> None:
    client, stubber = stubbed
    monkeypatch.setattr(greengrass, "MAX_PAGES", 2)
    stubber.add_response("get_core_device", core_device(), {"coreDeviceThingName": THING})
    other = [installed("aws.greengrass.Nucleus", "2.14.3", "FINISHED")]
    expect_pages(stubber, other, other, more=True)  # a third page is never asked for
    state = read_state(client, THING, COMPONENT)
    assert state.reading is Reading.UNKNOWN and state.reason is not None
    assert "first 200 installed components" in state.reason


def test_what_aws_says_is_bounded_and_printable(stubbed: tuple[Any, Stubber]) -> None:
    """The model allows 1,000-character details and any number of codes of 255 characters;
    a device's component may put its own words in the details."""
    client, stubber = stubbed
    stubber.add_response("get_core_device", core_device(), {"coreDeviceThingName": THING})
    details = ("[red]boom[/] \x1b[2J" + "x" * 1000)[:1000]
    codes = [f"RUN_ERROR_{i}" + "y" * 240 for i in range(30)]
    expect_pages(
        stubber,
        [
            installed(
                COMPONENT, DEPLOYED, "BROKEN",
                lifecycleStateDetails=details, lifecycleStatusCodes=codes,
            )
        ],
    )  # fmt: skip
    state = read_state(client, THING, COMPONENT)
    assert state.lifecycle_details is not None
    assert len(state.lifecycle_details) == greengrass.DETAILS_CHARS
    assert state.lifecycle_details.isprintable()
    assert len(state.status_codes) == greengrass.MAX_STATUS_CODES
    assert all(len(c) == greengrass.CODE_CHARS for c in state.status_codes)


def test_a_name_that_is_not_a_thing_name_is_never_sent(stubbed: tuple[Any, Stubber]) -> None:
    client, _ = stubbed  # nothing queued: any request would be answered UnStubbedResponse
    for name in ("", "a/../b", "x" * 129, "dev\n"):
        state = read_state(client, name, COMPONENT)
        assert (state.reading, state.reason) == (Reading.UNKNOWN, "not a thing name")


def test_devices_read_concurrently_keep_their_order() -> None:
    """Four workers on one client (no stubber: its queue is ordered): every device's answer
    lands on its own row."""
    client = greengrass_client()
    names = [f"dev-{i:02d}" for i in range(12)]

    def answer(request: Any, **_: Any) -> AWSResponse:
        path = request.url.split("?")[0]
        name = path.split("/coreDevices/")[1].split("/")[0]
        if path.endswith("installedComponents"):
            page = {"componentName": COMPONENT, "componentVersion": f"1.0.{names.index(name)}"}
            body = json.dumps({"installedComponents": [page | {"lifecycleState": "RUNNING"}]})
        else:
            body = json.dumps({"coreDeviceThingName": name, "status": "HEALTHY"})
        return AWSResponse(request.url, 200, JSON, _Raw(body.encode()))

    client.meta.events.register("before-send.greengrassv2", answer)
    states = read_states(client, names, COMPONENT, workers=4)
    assert list(states) == names
    assert [s.component_version for s in states.values()] == [f"1.0.{i}" for i in range(12)]


# --- the command ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def wide_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal wide enough for every column: the tests read cells, not the layout."""
    monkeypatch.setattr(operator, "console", lambda: Console(highlight=False, width=250))


def sfl_devices(where: Reachable, name: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    endpoint = ["--endpoint", where.stack.aws.endpoint_url, "--stack", name]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["devices", *argv, *endpoint])
    return code, out.getvalue(), err.getvalue()


def test_local_mode_says_local_and_asks_no_greengrass(
    federation: Reachable,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    original = Federation.client

    def client(self: Federation, service: str) -> Any:
        asked.append(service)
        return original(self, service)

    monkeypatch.setattr(Federation, "client", client)
    code, out, err = sfl_devices(federation, federation.name, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert sorted(r["client_id"] for r in rows) == sorted(DEVICES)
    assert {r["greengrass"]["reading"] for r in rows} == {"local"}
    code, out, err = sfl_devices(federation, federation.name)
    assert code == 0, err
    header, *lines = [line for line in out.splitlines() if "dev-" in line or "greengrass" in line]
    assert "greengrass" in header and "last error" in header
    assert len(lines) == len(DEVICES) and all("│ local " in line for line in lines)
    assert "greengrassv2" not in asked


@pytest.fixture
def deployed(federation: Reachable) -> Iterator[str]:  # noqa: F811 (the fixture)
    """The same federation as a deployed stack: its outputs without the local marker, with
    the component's name and version."""
    cloudformation = federation.stack.aws.client("cloudformation")
    (found,) = cloudformation.describe_stacks(StackName=federation.name)["Stacks"]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in found["Outputs"]}
    outputs.pop(LOCAL_OUTPUT)
    outputs |= {greengrass.COMPONENT_OUTPUT: COMPONENT, "ComponentVersion": DEPLOYED}
    name = f"{federation.name}-Deployed"
    template = {
        "Resources": {
            "Marker": {
                "Type": "AWS::SSM::Parameter",
                "Properties": {"Name": f"/{name}", "Type": "String", "Value": "x"},
            }
        },
        "Outputs": {k: {"Value": v} for k, v in outputs.items()},
    }
    cloudformation.create_stack(StackName=name, TemplateBody=json.dumps(template))
    yield name
    cloudformation.delete_stack(StackName=name)


def test_a_deployed_stack_shows_each_devices_component(
    federation: Reachable,  # noqa: F811 (the fixture)
    deployed: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dev-a runs the deployed version; dev-b's install failed; a third name is asked for but
    not in the registry; ``--no-greengrass`` asks Greengrass nothing."""
    client = greengrass_client()
    original = Federation.client
    monkeypatch.setattr(
        Federation,
        "client",
        lambda self, service: client if service == "greengrassv2" else original(self, service),
    )
    monkeypatch.setattr(greengrass, "WORKERS", 1)  # the stubber's queue is in order
    broken = installed(
        COMPONENT, "1.0.6", "BROKEN",
        lifecycleStatusCodes=["INSTALL_ERROR"], lifecycleStateDetails="[bold]pip[/] failed",
    )  # fmt: skip
    with Stubber(client) as stubber:
        expect_device(stubber, "dev-a", "HEALTHY", installed(COMPONENT, DEPLOYED, "RUNNING"))
        expect_device(stubber, "dev-b", "UNHEALTHY", broken)
        code, out, err = sfl_devices(federation, deployed, "--json")
        stubber.assert_no_pending_responses()
    assert code == 0, err
    rows = {r["client_id"]: r["greengrass"] for r in json.loads(out)}
    assert rows["dev-a"]["lifecycle_state"] == "RUNNING" and rows["dev-a"]["component_current"]
    assert rows["dev-b"] | {"core_status_at": None, "state_changed_at": None} == {
        "reading": "reported",
        "reason": None,
        "core_status": "UNHEALTHY",
        "core_status_at": None,
        "component": COMPONENT,
        "component_version": "1.0.6",
        "component_current": False,
        "lifecycle_state": "BROKEN",
        "lifecycle_details": "[bold]pip[/] failed",
        "status_codes": ["INSTALL_ERROR"],
        "state_changed_at": None,
        "reported_at": REPORTED.timestamp(),
    }

    with Stubber(client) as stubber:
        expect_device(stubber, "dev-b", "UNHEALTHY", broken)
        code, out, err = sfl_devices(federation, deployed, "--device", "dev-b", "--device", "x")
        stubber.assert_no_pending_responses()
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "dev-b" in line]
    assert "1.0.6 BROKEN (old)" in line and "INSTALL_ERROR: [bold]pip[/] failed" in line

    with Stubber(client) as stubber:  # nothing queued: a request would fail the read
        code, out, err = sfl_devices(federation, deployed, "--no-greengrass", "--json")
    assert code == 0, err
    assert {r["greengrass"]["reading"] for r in json.loads(out)} == {"not read"}


def test_one_look_reads_at_most_max_devices(
    federation: Reachable,  # noqa: F811 (the fixture)
    deployed: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = greengrass_client()
    original = Federation.client
    monkeypatch.setattr(
        Federation,
        "client",
        lambda self, service: client if service == "greengrassv2" else original(self, service),
    )
    monkeypatch.setattr(greengrass, "MAX_DEVICES", 1)
    with Stubber(client) as stubber:
        stubber.add_client_error(
            "get_core_device",
            service_error_code="ResourceNotFoundException",
            http_status_code=404,
            expected_params={"coreDeviceThingName": "dev-a"},
        )
        code, out, err = sfl_devices(federation, deployed)
        stubber.assert_no_pending_responses()
    assert code == 0, err
    (a,) = [line for line in out.splitlines() if "dev-a" in line]
    (b,) = [line for line in out.splitlines() if "dev-b" in line]
    assert "│ none " in a and "│ not read " in b
    assert "greengrass: not read for 1 of 2 devices, past the first 1 devices of a look" in out


def test_a_stack_without_the_component_output_reads_unknown_and_asks_nothing() -> None:
    session = boto3.session.Session(region_name="eu-west-1")
    fed = Federation(stack="Sfl-Old", session=session, outputs={})
    states = greengrass.component_states(fed, ["dev-a", "dev-b"])
    assert {s.reading for s in states.values()} == {Reading.UNKNOWN}
    assert "no output ComponentName" in (states["dev-a"].reason or "")
    assert fed._clients == {}


class _Answering:
    """A Greengrass client that answers one device with whatever the test says."""

    def __init__(self, component: dict[str, Any]) -> None:
        self.component = component

    def get_core_device(self, **_: Any) -> dict[str, Any]:
        return core_device("UNHEALTHY")

    def list_installed_components(self, **_: Any) -> dict[str, Any]:
        return {"installedComponents": [self.component]}


_MODEL_TEXT = st.text(st.characters(codec="utf-8"), min_size=1)


@settings(max_examples=200, deadline=None)
@given(
    version=_MODEL_TEXT.filter(lambda v: len(v) <= 64),
    state=st.sampled_from(["NEW", "RUNNING", "ERRORED", "BROKEN", "FINISHED"]),
    details=st.text(st.characters(codec="utf-8"), min_size=1, max_size=1000),
    codes=st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=255), max_size=40),
)
def test_whatever_a_device_reported_is_shown_as_text_never_as_markup(
    version: str, state: str, details: str, codes: list[str]
) -> None:
    """A device's nucleus writes what Greengrass reports of it (versions, details, codes):
    within the model's bounds, any of it comes out bounded, printable, and in the table
    exactly as text (rich markup in it stays literal)."""
    from rich.table import Table

    from sfl.cli.status import _greengrass_cells

    component = installed(COMPONENT, version, state, lifecycleStateDetails=details)
    component["lifecycleStatusCodes"] = codes
    found = read_state(_Answering(component), THING, COMPONENT, DEPLOYED)
    assert found.reading is Reading.REPORTED
    shown = [found.component_version or "", found.lifecycle_details or "", *found.status_codes]
    assert all(text.isprintable() for text in shown)
    assert len(found.lifecycle_details or "") <= greengrass.DETAILS_CHARS
    assert len(found.status_codes) <= greengrass.MAX_STATUS_CODES
    cell, _since, error = _greengrass_cells(found, now=REPORTED.timestamp())
    assert cell.plain.startswith(f"{found.component_version} {state}")
    said = ", ".join(found.status_codes)
    said = f"{said}: {found.lifecycle_details}" if said else str(found.lifecycle_details)
    assert error.plain == (said if len(said) <= 80 else said[:79] + "…")
    table = Table()
    for column in ("greengrass", "since", "last error"):
        table.add_column(column)
    table.add_row(cell, _since, error)
    Console(file=io.StringIO(), width=250).print(table)  # renders: no markup error
