"""Fuzzing buffered mode's answer path: every upload is accepted or refused with a reason.

What a device controls reaches ``buffered_answers.handle_update`` (through the averager's
front, as the Lambda handler calls it) on the local emulator: hostile keys (other devices'
tickets, tickets never issued, far past and far future numbers, arbitrary text), hostile
metadata (base versions far behind or ahead of the ticket's, example counts that are zero,
negative, huge or not numbers, wrong types everywhere) and hostile tensors. Hypothesis draws
a fixed budget with a fixed seed (the same cases on every run, as tests/test_fuzz_acceptance.py
does for the bytes alone). Every case ends in an outcome with a stable reason, never an
exception; the state it leaves is bounded by what the server issued, not by what was sent,
and no device moves its update's staleness.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.learning import codec
from sfl.server.answers import UpdateOutcome, UpdateResult
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.server.notifications import UpdateEvent
from sfl.state.buffers import BufferStore, Ticket, TicketState
from sfl.state.model_store import ModelStore
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import Outcome
from tests.conftest import Stack

DEVICES = [f"dev{i}" for i in range(6)]
MODEL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.tensor([7])}
EXPERIMENT = "fuzzbuf"
CONFIG = FederationConfig(
    experiment=EXPERIMENT,
    mode="buffered",
    buffer_size=2,
    concurrency=len(DEVICES),
    max_staleness=1,
    selection="random",
    round_deadline_seconds=600,
)
FUZZ = settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    # The fleet lives on from case to case, so a failing case is not replayed alone: it is
    # reported as drawn, not shrunk.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
# A refusal's reason: a stable code, then what the averager says of it.
REASON = re.compile(r"^[a-z_]+(: .+)?$", re.DOTALL)

NUMBER_TEXT = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["0", "-0", "1.5", "1e400", "NaN", "-inf", "Infinity", "0x10", " 3", "3 "]),
    st.sampled_from(["9" * 5000, "", "null", "true", "[]", "{}", '{"a": 1}', "١٢"]),
    st.text(max_size=20),
)
JSON_TEXT = st.one_of(
    st.sampled_from(['{"loss": 1e300}', '{"loss": "x"}', "[1, 2]", '{"a": {"b": []}}', "nan"]),
    st.dictionaries(st.text(max_size=8), st.floats() | st.text(max_size=8), max_size=4).map(
        json.dumps
    ),
    st.text(max_size=40),
)
# How far the claimed base version is from the ticket's: the staleness a device would forge.
VERSION_SHIFTS = st.sampled_from([0, 0, 0, 1, -1, 2, 10**6, -(10**6), 10**15])
METADATA_CHANGES = st.dictionaries(
    st.sampled_from(
        [
            "round",
            "client_id",
            "base_version",
            "num_examples",
            "metrics",
            "timings",
            "bytes_down",
            "upload_started_at",
            "format",
            "extra",
        ]
    ),
    NUMBER_TEXT | JSON_TEXT,
    max_size=4,
)
TENSORS = st.sampled_from(["honest", "honest", "unchanged", "nan", "shape", "huge", "counter"])
# Whose key the upload names: the ticket's own, another device's, or text of the device's.
KEYS = st.one_of(
    st.just("own"),
    st.just("own"),
    st.just("own"),
    st.tuples(st.just("foreign"), st.sampled_from(DEVICES)),
    st.tuples(
        st.just("number"), st.sampled_from([0, 10**6 - 1, 10**6, 10**12, -1]) | st.integers(0, 50)
    ),
    st.tuples(
        st.just("text"),
        st.text(
            st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs",)),
            max_size=120,
        ),
    ),
    st.tuples(
        st.just("shaped"),
        st.sampled_from(
            [
                "updates/../round-000001.safetensors",
                "updates/dev0/round-000001.safetensors/x",
                "updates/dev0/round-1.safetensors",
                "updates/dev0/round-0000001.safetensors",
                "updates//round-000001.safetensors",
                "updates/dev 0/round-000001.safetensors",
                "updates/" + "d" * 300 + "/round-000001.safetensors",
                "UPDATES/dev0/round-000001.safetensors",
                "updates/dev0/round-000001.SAFETENSORS",
                "updates/dev0/round-+00001.safetensors",
            ]
        ),
    ),
)


def _trained(base: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    if kind == "unchanged":
        return {k: v.clone() for k, v in base.items()}
    out = {k: (v + 0.25 if v.dtype.is_floating_point else v.clone()) for k, v in base.items()}
    if kind == "nan":
        out["w"] = torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])
    elif kind == "shape":
        out["w"] = torch.zeros(3, 3)
    elif kind == "huge":
        out["w"] = torch.full((2, 2), 3e38)
    elif kind == "counter":
        out["n"] = torch.tensor([2**62])
    return out


#: What the fuzz's cases came to, over the session (result/reason code: count).
OUTCOMES: dict[str, int] = {}


class Fleet:
    """A buffered federation on the emulator whose devices upload what hypothesis draws."""

    def __init__(self, stack: Stack) -> None:
        self.aws, self.names = stack.clients, stack.names
        stack.put_model(0, MODEL)
        self.now = time.time()
        self.store = BufferStore(self.aws.dynamodb, self.names.rounds_table)
        self.models = ModelStore(self.aws.s3, self.names.models_bucket)
        self.averager = Averager(self.aws, self.names, CONFIG, clock=lambda: self.now)

    def open_ticket(self, pick: int) -> Ticket:
        """One of the open tickets; issue tickets when none is open (devices heartbeat)."""
        training = self.store.training(EXPERIMENT)
        if not training:
            registry = ClientRegistry(self.aws.dynamodb, self.names.clients_table)
            for device in DEVICES:
                registry.heartbeat(device, now=self.now, active_window_seconds=1_800)
            start_round(self.aws, self.names, CONFIG, clock=lambda: self.now)
            training = self.store.training(EXPERIMENT)
        assert training, "the initiator issued no ticket"
        return training[pick % len(training)]

    def key_for(self, ticket: Ticket, how: Any) -> tuple[str, str, int]:
        """The key an upload is stored at, and the client and number its metadata names."""
        if how == "own":
            return (
                layout.update_key(ticket.client_id, ticket.number),
                ticket.client_id,
                ticket.number,
            )
        kind, value = how
        if kind == "foreign":
            return layout.update_key(value, ticket.number), value, ticket.number
        if kind == "number":
            return (
                f"updates/{ticket.client_id}/round-{value:06d}.safetensors",
                ticket.client_id,
                value,
            )
        return (
            value if kind == "shaped" else layout.UPDATES_PREFIX + value,
            ticket.client_id,
            ticket.number,
        )

    def upload(
        self,
        ticket: Ticket,
        how: Any,
        tensors: str,
        shift: int,
        changes: dict[str, str],
    ) -> UpdateOutcome:
        key, client, number = self.key_for(ticket, how)
        base = codec.decode(self.models.model_bytes(ticket.base_version))
        meta = codec.UpdateMetadata(
            round=number,
            client_id=client,
            base_version=ticket.base_version + shift,
            num_examples=20,
            metrics={"loss": 1.0, "accuracy": 0.5},
        ).to_header()
        body = codec.encode(_trained(base, tensors), {**meta, **changes})
        bucket = self.names.updates_bucket
        put = self.aws.s3.put_object(Bucket=bucket, Key=key, Body=body)
        event = UpdateEvent(bucket, key, len(body), str(put["ETag"]).strip('"'), self.now)
        return self.averager.handle_update(event)

    def check(self, outcome: UpdateOutcome) -> None:
        assert isinstance(outcome, UpdateOutcome)
        if outcome.result in (UpdateResult.REJECTED, UpdateResult.IGNORED):
            assert REASON.match(outcome.reason), outcome.reason
        code = outcome.result.value
        if outcome.reason:
            code += "/" + outcome.reason.split(":")[0]
        OUTCOMES[code] = OUTCOMES.get(code, 0) + 1
        pool = self.store.pool(EXPERIMENT)
        assert pool is not None
        tickets = self.store.tickets(EXPERIMENT)
        # State grows with what the server issued, never with what devices sent: one answer
        # per ticket, every member an accepted ticket's, a bounded answer on each.
        assert pool.issued == len(tickets)
        answered = [t for t in tickets if t.status is TicketState.ANSWERED]
        assert pool.answered == len(answered)
        for t in answered:
            assert t.answer is not None and len(t.answer.reason) <= 500
            if t.answer.outcome is not Outcome.ACCEPTED:
                assert REASON.match(t.answer.reason), t.answer.reason
        by_number = {t.number: t for t in tickets}
        members = [
            m
            for b in self.store.buffers(EXPERIMENT)
            for m in self.store.members(EXPERIMENT, b.number)
        ]
        assert len(members) == pool.accepted
        for m in members:
            # The staleness a step weighs is the server's: the ticket's base, not a claim.
            assert m.base_version == by_number[m.ticket].base_version
            assert m.client_id == by_number[m.ticket].client_id
        listing = self.aws.s3.list_objects_v2(Bucket=self.names.updates_bucket)
        assert listing.get("KeyCount", 0) <= len(answered), "junk uploads piled up"


@pytest.fixture
def fleet(stack: Stack) -> Fleet:
    return Fleet(stack)


@FUZZ
@given(
    st.integers(0, 2**16),
    KEYS,
    TENSORS,
    VERSION_SHIFTS,
    METADATA_CHANGES,
)
def test_every_hostile_upload_is_accepted_or_refused_with_a_reason(
    fleet: Fleet,
    pick: int,
    how: Any,
    tensors: str,
    shift: int,
    changes: dict[str, str],
) -> None:
    ticket = fleet.open_ticket(pick)
    outcome = fleet.upload(ticket, how, tensors, shift, changes)
    fleet.check(outcome)
    if outcome.result is UpdateResult.ACCEPTED:
        assert how == "own" and shift == 0, (how, shift)
        assert tensors not in ("unchanged", "nan", "shape"), tensors
    fleet.now += 1


def test_the_fuzz_reached_every_kind_of_outcome(capsys: Any) -> None:
    """The cases got past the key into the judging, the ticket checks and the buffers."""
    if not OUTCOMES:
        pytest.skip("the fuzz did not run in this session")
    with capsys.disabled():
        print(f"\nbuffered answer fuzz outcomes: {dict(sorted(OUTCOMES.items()))}")
    reached = set(OUTCOMES)
    assert {
        "accepted",
        "rejected/malformed_key",
        "rejected/not_selected",
        "rejected/unknown_round",
        "rejected/wrong_base_version",
    } <= reached, reached
    judged = {code for code in reached if code.startswith("rejected/")} - {
        "rejected/malformed_key",
        "rejected/not_selected",
        "rejected/unknown_round",
        "rejected/duplicate",
    }
    assert len(judged) >= 3, reached  # refusals of the bytes and the metadata, not the key


@pytest.mark.parametrize("mode", ["rounds", "buffered"])
def test_a_key_of_round_zero_is_refused_as_malformed_in_both_modes(stack: Stack, mode: str) -> None:
    """Found by the fuzz: a device may store ``round-000000`` under its own prefix; its key
    is refused with a reason (and the object deleted), not a ValueError that fails the
    invocation and sends the event to the failure queue."""
    stack.put_model(0, MODEL)
    key = "updates/dev0/round-000000.safetensors"
    bucket = stack.names.updates_bucket
    put = stack.clients.s3.put_object(Bucket=bucket, Key=key, Body=b"junk")
    event = UpdateEvent(bucket, key, 4, str(put["ETag"]).strip('"'), time.time())
    averager = Averager(stack.clients, stack.names, CONFIG.replace(mode=mode))

    outcome = averager.handle_update(event)

    assert (outcome.result, outcome.reason) == (UpdateResult.REJECTED, "malformed_key")
    assert stack.clients.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
