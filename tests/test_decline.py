"""A picked device that cannot give an update declines, and a misbehaving task costs one answer.

The story: the user's own task modules, written here outside the repository (one raises in
``train``, one returns a NaN loss, one changes a layer's shape, one has no data yet, one
trains past the deadline), run by real edge clients against a local federation. Each
misbehaves once: the device declines that round with the reason, the server records it as
that device's answer, the round closes without waiting for its soft deadline, and the same
client process answers the next round with an accepted update. Then the decline's wire form
on its own: what the averager makes of it, and a fuzz of its parser.
"""

from __future__ import annotations

import json
import struct
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_client.client import EdgeClient
from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.decline import DECLINE_FORMAT, MAX_DETAIL_CHARS, Decline, DeclineReason
from sfl.learning import codec
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.local.emulator import LocalAws
from sfl.local.federation import LocalFederation
from sfl.server.acceptance import Expected, UpdateRejected, read_decline
from sfl.server.answers import UpdateOutcome
from sfl.server.averager import Averager
from sfl.server.notifications import UpdateEvent
from sfl.state.control import ControlStore
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import Outcome, Round, RoundState
from tests.conftest import TRAINED, Stack
from tests.test_deadlines import _setup

# --- the user's tasks, as a user would write them in their own project ------------------------

USER_TASKS = '''
"""Digits tasks that misbehave on their first round, then behave."""

import math
import time

from torch import nn

from sfl.learning.tasks.base import ArrayDataset, ClientData, Metrics
from sfl.learning.tasks.digits import DigitsTask


class OnceTask(DigitsTask):
    misbehaved = False

    def first_time(self):
        first = not type(self).misbehaved
        type(self).misbehaved = True
        return first


class RaisesInTrain(OnceTask):
    def train(self, model, data, config, should_stop=lambda: False):
        if self.first_time():
            raise RuntimeError("the user's bug in train")
        return super().train(model, data, config, should_stop)


class NanLoss(OnceTask):
    def train(self, model, data, config, should_stop=lambda: False):
        metrics = super().train(model, data, config, should_stop)
        if self.first_time():
            return Metrics(loss=math.nan, accuracy=0.0, num_examples=len(data))
        return metrics


class ChangesShape(OnceTask):
    def train(self, model, data, config, should_stop=lambda: False):
        metrics = super().train(model, data, config, should_stop)
        if self.first_time():
            model[-1] = nn.Linear(64, 11)  # one class more than the federation's model
        return metrics


class NoDataYet(OnceTask):
    def load_client_data(self, data_dir):
        data = super().load_client_data(data_dir)
        if self.first_time():
            empty = ArrayDataset(x=data.train.x[:0], y=data.train.y[:0])
            return ClientData(train=empty, eval=data.eval)
        return data


class TrainsPastTheDeadline(OnceTask):
    def train(self, model, data, config, should_stop=lambda: False):
        if self.first_time():
            give_up = time.monotonic() + 60
            while not should_stop() and time.monotonic() < give_up:
                time.sleep(0.05)
            return Metrics(loss=1.0, accuracy=0.0, num_examples=len(data))
        return super().train(model, data, config, should_stop)
'''


def _user_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> str:
    """Write the user's task module outside the repository; its import path for ``case``."""
    module = f"user_tasks_{case.lower()}"
    project = tmp_path / "my_project"
    project.mkdir(exist_ok=True)
    (project / f"{module}.py").write_text(textwrap.dedent(USER_TASKS))
    monkeypatch.syspath_prepend(str(project))
    return f"{module}:{case}"


# --- driving real clients against a local federation --------------------------------------


@dataclass
class Device:
    client: EdgeClient
    thread: threading.Thread


@pytest.fixture
def fleet(local_aws: LocalAws, tmp_path: Path) -> Iterator[Any]:
    """Start a federation with a config and clients (id -> task); stop it all afterwards."""
    stop = threading.Event()
    running: list[LocalFederation] = []
    devices: list[Device] = []

    def start(config: FederationConfig, tasks: dict[str, str]) -> tuple[Any, dict[str, Device]]:
        federation = LocalFederation(config, aws=local_aws, log_path=tmp_path / "lambdas.jsonl")
        running.append(federation.__enter__())
        started = {}
        for cid, task in tasks.items():
            settings = replace(
                federation.client_settings(cid, data_dir=tmp_path / "data" / cid, task=task),
                poll_seconds=0.2,
                heartbeat_seconds=1.0,
            )
            client = EdgeClient(
                settings,
                federation.aws.clients(),
                load_task(task),
                stop=stop,
                wake=federation.assignment_wake_up(stop),
            )
            thread = threading.Thread(target=client.run, name=cid, daemon=True)
            thread.start()
            started[cid] = Device(client, thread)
        devices.extend(started.values())
        _wait_for_registration(federation, set(tasks))
        return federation, started

    yield start
    stop.set()
    for device in devices:
        device.thread.join(timeout=30)
    for federation in running:
        federation.__exit__()


def _wait_for_registration(federation: LocalFederation, clients: set[str]) -> None:
    registry = ClientRegistry(federation.clients.dynamodb, federation.names.clients_table)
    give_up = time.time() + 60
    while time.time() < give_up:
        seen = registry.everyone(
            now=time.time(), active_window_seconds=federation.config.active_window_seconds
        )
        if clients <= {c.client_id for c in seen}:
            return
        time.sleep(0.1)
    raise AssertionError(f"clients {clients} never registered")


def _round(federation: LocalFederation, number: int) -> Round:
    started = federation.start_round()
    assert started["started"] and started["round"] == number, started
    assert federation.wait_for_round(number, timeout=120).finished
    finished = federation.rounds.get(federation.config.experiment, number)
    assert finished is not None
    return finished


def _set_config(federation: LocalFederation, **changes: str) -> None:
    """``sfl config set``: applies from the next round."""
    control = ControlStore(federation.clients.dynamodb, federation.names.rounds_table)
    control.set_config(federation.config, changes, now=time.time())


def _config(**changes: Any) -> FederationConfig:
    base = FederationConfig(
        experiment="test", selection="all", local_epochs=1, aggregation_lease_seconds=30
    )
    return replace(base, **changes)


def _split(tmp_path: Path, *client_ids: str) -> None:
    task = load_task("digits")
    write_client_splits(
        task, tmp_path / "data", len(client_ids), "iid", 0, client_ids=[*client_ids]
    )


MISBEHAVING = {
    "RaisesInTrain": "task_failed: train: RuntimeError: the user's bug in train",
    "NanLoss": "non_finite_loss: train_loss not finite",
    "ChangesShape": "wrong_shape: 2 tensor(s) differ from the base model, e.g. '8.bias'",
    "NoDataYet": "no_data: no training examples",
}


@pytest.mark.parametrize("case", sorted(MISBEHAVING))
def test_a_misbehaving_task_costs_one_answer_and_the_client_answers_the_next_round(
    fleet: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    _split(tmp_path, "honest", "user")
    federation, devices = fleet(
        _config(), {"honest": "digits", "user": _user_tasks(tmp_path, monkeypatch, case)}
    )

    first = _round(federation, 1)

    assert first.status is RoundState.CLOSED and list(first.accepted) == ["honest"]
    declined = first.answers["user"]
    assert declined.outcome is Outcome.DECLINED and declined.reason == MISBEHAVING[case]
    assert first.decline_reasons == {MISBEHAVING[case].split(":")[0]: 1}
    assert first.finished_at is not None and first.finished_at < first.soft_deadline_at

    second = _round(federation, 2)

    assert second.status is RoundState.CLOSED and list(second.accepted) == ["honest", "user"]
    user = devices["user"]
    assert user.thread.is_alive()
    assert (user.client.rounds_declined, user.client.rounds_answered) == (1, 1)
    registry = ClientRegistry(federation.clients.dynamodb, federation.names.clients_table)
    record = registry.get("user")
    assert record is not None and record.rounds_missed == 1  # a decline counts as a miss


def test_a_device_reads_its_data_afresh_each_round(fleet: Any, tmp_path: Path) -> None:
    """No data when picked: a decline; the data it collects before the next round counts."""
    _split(tmp_path, "honest")
    federation, _ = fleet(_config(), {"honest": "digits", "newcomer": "digits"})

    first = _round(federation, 1)

    assert first.answers["newcomer"].outcome is Outcome.DECLINED
    assert first.answers["newcomer"].reason.startswith("no_data: ")
    assert first.status is RoundState.CLOSED and first.finished_at < first.soft_deadline_at
    write_client_splits(
        load_task("digits"), tmp_path / "data", 1, "iid", 1, client_ids=["newcomer"]
    )

    second = _round(federation, 2)

    assert list(second.accepted) == ["honest", "newcomer"]
    assert second.answers["newcomer"].num_examples > 0


def test_fewer_examples_than_the_federation_asks_for_is_a_decline(
    fleet: Any, tmp_path: Path
) -> None:
    _split(tmp_path, "small")
    federation, devices = fleet(_config(min_examples=100_000), {"small": "digits"})

    first = _round(federation, 1)

    assert first.answers["small"].outcome is Outcome.DECLINED
    assert first.answers["small"].reason.startswith("too_few_examples: ")
    assert "at least 100000" in first.answers["small"].reason
    # Nothing to aggregate: abandoned at once, not at the deadline.
    assert first.status is RoundState.ABANDONED and "declined" in first.abandon_reason
    assert first.finished_at is not None and first.finished_at < first.soft_deadline_at

    _set_config(federation, min_examples="1")
    second = _round(federation, 2)

    assert list(second.accepted) == ["small"] and devices["small"].thread.is_alive()


def test_training_past_the_deadline_is_stopped_and_declined(
    fleet: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _split(tmp_path, "slow")
    task = _user_tasks(tmp_path, monkeypatch, "TrainsPastTheDeadline")
    config = _config(round_deadline_seconds=8, round_soft_deadline_seconds=8)
    federation, devices = fleet(config, {"slow": task})

    first = _round(federation, 1)

    # The task trains until should_stop says the deadline is near: the decline gets there
    # before the hard deadline and is that device's answer (not a late upload).
    assert first.answers["slow"].outcome is Outcome.DECLINED
    assert first.answers["slow"].reason.startswith("deadline: ")
    assert first.rejection_counts == {}
    assert first.status is RoundState.ABANDONED and "declined" in first.abandon_reason

    _set_config(federation, round_deadline_seconds="600", round_soft_deadline_seconds="600")
    second = _round(federation, 2)

    assert list(second.accepted) == ["slow"] and devices["slow"].thread.is_alive()


# --- the averager's side of a decline ------------------------------------------------------


def _decline(client: str, **changes: str) -> bytes:
    """A decline of round 1 by ``client`` (no data), with header fields changed as a hostile
    device might."""
    decline = Decline(1, client, 0, DeclineReason.NO_DATA, "empty")
    return _framed({**decline.to_header(), **changes}) if changes else decline.encode()


def _framed(metadata: dict[str, str], tensors: bytes = b"") -> bytes:
    raw = json.dumps({"__metadata__": metadata}).encode()
    return struct.pack("<Q", len(raw)) + raw + tensors


def _deliver(averager: Averager, stack: Stack, client: str, body: bytes) -> UpdateOutcome:
    event = stack.upload_update(client, 1, {}, body=body)["Records"][0]["s3"]
    return averager.handle_update(
        UpdateEvent(
            bucket=event["bucket"]["name"],
            key=layout.update_key(client, 1),
            size=event["object"]["size"],
            etag=event["object"]["eTag"],
        )
    )


def test_a_decline_is_the_devices_answer_and_the_round_does_not_wait_for_it(
    stack: Stack,
) -> None:
    averager, _, store = _setup(stack, "a", "b", quorum="min_fraction")

    assert _deliver(averager, stack, "b", _decline("b")).result == "declined"
    finished = _deliver(averager, stack, "a", _update("a"))

    assert finished.finished_round == 1  # at once, not at the soft deadline
    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    assert round_.answers["b"].outcome is Outcome.DECLINED
    assert round_.answers["b"].reason == "no_data: empty"
    assert (round_.num_declined, round_.decline_reasons, round_.rejection_reasons) == (
        1,
        {"no_data": 1},
        {},
    )
    assert round_.summary["participants"] == 1
    record = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table).get("b")
    assert record is not None and (record.rounds_missed, record.missed_streak) == (1, 1)


def _update(client: str) -> bytes:
    meta = codec.UpdateMetadata(round=1, client_id=client, base_version=0, num_examples=10)
    return codec.encode(TRAINED, meta.to_header())


def test_a_decline_the_round_did_not_ask_for_is_refused_like_such_an_update(
    stack: Stack,
) -> None:
    averager, _, store = _setup(stack, "a", "b", quorum="all_answered")
    stack.register("stranger")

    assert _deliver(averager, stack, "stranger", _decline("stranger")).reason == "not_selected"
    assert _deliver(averager, stack, "a", _decline("a")).result == "declined"
    again = _decline("a", reason=DeclineReason.TASK_FAILED.value)
    assert _deliver(averager, stack, "a", again).reason == "duplicate"

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.OPEN
    assert round_.answers["a"].reason == "no_data: empty" and round_.num_answered == 1
    assert round_.rejection_counts == {}  # refusals that are no answer write nothing


MALFORMED = {
    "a reason outside the set": ({"reason": "bored"}, "unknown_decline_reason"),
    "a key a decline does not have": ({"num_examples": "10"}, "metadata_malformed"),
    "another round": ({"round": "2"}, "wrong_round"),
    "another client": ({"client_id": "b"}, "wrong_client"),
    "another base": ({"base_version": "3"}, "wrong_base_version"),
    "no round": ({"round": "one"}, "metadata_malformed"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_decline_is_rejected_with_a_reason(stack: Stack, case: str) -> None:
    averager, _, store = _setup(stack, "a", "b")
    changes, reason = MALFORMED[case]

    outcome = _deliver(averager, stack, "a", _decline("a", **changes))

    assert (outcome.result, outcome.reason.split(":")[0]) == ("rejected", reason)
    round_ = store.get("test", 1)
    assert round_ is not None and round_.rejection_reasons == {reason: 1}


def test_a_decline_carrying_tensors_is_rejected(stack: Stack) -> None:
    averager, _, _ = _setup(stack, "a", "b")
    header = Decline(1, "a", 0, DeclineReason.NO_DATA).to_header()

    outcome = _deliver(averager, stack, "a", codec.encode(TRAINED, header))

    assert outcome.result == "rejected"
    assert outcome.reason == "malformed_decline: a decline carries no tensors"


# --- the parser, on its own ----------------------------------------------------------------

BASE_HEADER = codec.parse_header(codec.encode_model({"w": torch.zeros(2, 2)}, version=4))
EXPECTED = Expected(
    round=9,
    client_id="device-1",
    base_version=4,
    base_header=BASE_HEADER,
    max_bytes=1 << 20,
    max_num_examples=100_000,
)
VALID = Decline(9, "device-1", 4, DeclineReason.TOO_FEW_EXAMPLES, "3 examples").to_header()
FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def judge(data: bytes) -> Decline | UpdateRejected | None:
    """What the averager makes of ``data`` as a decline: one, a rejection, or not a decline."""
    try:
        return read_decline(data, EXPECTED)
    except UpdateRejected as e:
        rejection = e
    assert rejection.reason.replace("_", "").isalpha(), rejection.reason  # a stable code
    return rejection


def test_a_decline_round_trips_and_its_detail_is_bounded() -> None:
    long = Decline(9, "device-1", 4, DeclineReason.TASK_FAILED, "x\x1b[31m" + "y" * 5_000)
    found = judge(long.encode())

    assert isinstance(found, Decline) and found.reason is DeclineReason.TASK_FAILED
    assert len(found.detail) == MAX_DETAIL_CHARS and "\x1b" not in found.detail
    # A device writing its own header, with a detail of any length: cut, not refused.
    padded = judge(_framed({**VALID, "detail": "z" * 10_000}))
    assert isinstance(padded, Decline) and padded.detail == "z" * MAX_DETAIL_CHARS


def test_an_update_is_not_a_decline() -> None:
    update = codec.encode(
        {"w": torch.ones(2, 2)},
        codec.UpdateMetadata(
            round=9, client_id="device-1", base_version=4, num_examples=1
        ).to_header(),
    )
    assert judge(update) is None and judge(b"not safetensors") is None


@FUZZ
@given(st.dictionaries(st.sampled_from([*sorted(VALID), "extra"]), st.text(max_size=60)))
def test_fuzz_decline_metadata_is_a_decline_or_a_rejection(changes: dict[str, str]) -> None:
    result = judge(_framed({**VALID, **changes, "format": DECLINE_FORMAT}))
    assert isinstance(result, Decline | UpdateRejected)
    if isinstance(result, Decline):
        assert result.reason in set(DeclineReason) and len(result.detail) <= MAX_DETAIL_CHARS
        assert (result.round, result.client_id, result.base_version) == (9, "device-1", 4)


@FUZZ
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=8))
def test_fuzz_any_metadata_map_is_parsed_or_refused(metadata: dict[str, str]) -> None:
    try:
        decline = Decline.from_header({**metadata, "format": DECLINE_FORMAT})
    except codec.CodecError as e:
        refused = e.reason
    else:
        assert decline.reason in set(DeclineReason)
        return
    assert refused.replace("_", "").isalpha(), refused


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 400))
def test_fuzz_bytes_spliced_into_a_decline_never_escape(noise: bytes, at: int) -> None:
    valid = Decline(9, "device-1", 4, DeclineReason.DEADLINE, "late").encode()
    assert isinstance(judge(valid[:at] + noise + valid[at:]), Decline | UpdateRejected | None)
    assert isinstance(judge(noise), Decline | UpdateRejected | None)
