"""Cost per buffered version: each version records what it was charged with (the pool's counts
since the version before it, and its own step) and its estimated dollars, through the real
handlers; pricing that fails leaves the version written, with ``usd`` None and the reason."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sfl.core import layout
from sfl.core.config import FederationConfig
from sfl.core.cost import CostAssumptions
from sfl.local.emulator import LocalAws
from sfl.local.federation import LocalFederation
from sfl.local.simulate import version_row
from sfl.server import pricing
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.server.notifications import UpdateEvent
from sfl.state.buffers import BufferState, BufferStore, Ticket, TicketState
from sfl.state.model_store import ModelStore
from sfl.state.rounds import Outcome
from tests.test_buffered import _heartbeat, _update, _wait


def test_each_version_of_a_local_run_records_what_it_caused_and_its_dollars(
    local_aws: LocalAws, tmp_path: Path
) -> None:
    """Version 1: one ticketing run, 3 tickets, 3 answers (one refused); version 2: the next
    run's tickets and the two answers after version 1's step. Each version's cost counts
    exactly those, and the two add up to what the pool counted."""
    config = FederationConfig(
        experiment="priced", mode="buffered", buffer_size=2, concurrency=3, selection="random"
    )
    with LocalFederation(config, aws=local_aws, log_path=tmp_path / "lambdas.jsonl") as fed:
        clients, names = fed.clients, fed.names
        store = BufferStore(clients.dynamodb, names.rounds_table)
        models = ModelStore(clients.s3, names.models_bucket)
        _heartbeat(clients, names.clients_table, "d0", "d1", "d2", now=time.time())
        uploaded: dict[int, bytes] = {}

        def answer(ticket: Ticket, body: bytes) -> None:
            uploaded[ticket.number] = body
            clients.s3.put_object(
                Bucket=names.updates_bucket,
                Key=layout.update_key(ticket.client_id, ticket.number),
                Body=body,
            )
            _wait(lambda: store.ticket("priced", ticket.number).status is TicketState.ANSWERED)  # type: ignore[union-attr]

        assert fed.start_round()["started"]
        first = store.training("priced")
        assert len(first) == 3
        answer(first[2], b"not a safetensors file")  # judged and refused
        answer(first[0], _update(models, first[0], 0.01))
        answer(first[1], _update(models, first[1], 0.02))
        _wait(lambda: (store.buffer("priced", 1) or first).status is BufferState.CLOSED)  # type: ignore[union-attr]

        assert fed.start_round()["started"]
        second = store.training("priced")
        assert len(second) >= 2 and all(t.base_version == 1 for t in second)
        answer(second[0], _update(models, second[0], 0.01))
        answer(second[1], _update(models, second[1], -0.01))
        _wait(lambda: (store.buffer("priced", 2) or first).status is BufferState.CLOSED)  # type: ignore[union-attr]
        fed.stop_events()

        refused = store.ticket("priced", first[2].number)
        assert refused is not None and refused.answer is not None
        assert refused.answer.outcome is Outcome.REJECTED
        one, two = store.buffer("priced", 1), store.buffer("priced", 2)
        pool = store.pool("priced")
        assert one is not None and two is not None and pool is not None

        a = CostAssumptions()
        for buffer, tickets, answered in ((one, first, first), (two, second, second[:2])):
            cost = buffer.summary["cost"]
            counted = cost["counted"]
            assert counted["issue_runs"] == 1 and counted["issued"] == len(tickets)
            assert counted["answered"] == len(answered) and counted["expired"] == 0
            assert counted["answer_bytes"] == sum(len(uploaded[t.number]) for t in answered)
            assert counted["members"] == 2
            assert counted["member_bytes"] == sum(
                len(uploaded[t.number]) for t in answered if t.number != first[2].number
            )
            assert counted["handling_seconds"] > 0 and counted["select_seconds"] >= 0
            usage = cost["usage"]
            assert usage["lambda_invocations"] == {"initiator": 1, "averager": len(answered)}
            assert usage["bytes_in_internet"] == counted["answer_bytes"]
            model_bytes = len(models.model_bytes(buffer.version))
            assert buffer.summary["model_bytes"] == model_bytes
            assert usage["bytes_out_internet"] == len(tickets) * (model_bytes + a.assignment_bytes)
            assert cost["region"] == "us-east-1" and cost["usd"] > 0
            assert cost["usd"] == pytest.approx(sum(cost["items"].values()))
            # history.json's row of the version carries the same figure.
            row = version_row(buffer, {"accuracy": 0.0, "loss": 0.0}, seconds=0.0, at=0.0)
            assert row["cost"] == cost
        first_counted = one.summary["cost"]["counted"]
        assert (first_counted["accepted"], first_counted["rejected"]) == (2, 1)

        # Nothing is counted twice or left out: the versions add up to the pool's counts at
        # the last step (no answer came after it).
        for name in ("issue_runs", "issued", "answered", "accepted", "rejected", "answer_bytes"):
            charged = one.summary["cost"]["counted"][name] + two.summary["cost"]["counted"][name]
            assert charged == getattr(pool.counts, name) == two.summary["pool_counts"][name]


def _event(aws: Any, names: Any, models: ModelStore, ticket: Ticket, now: float) -> UpdateEvent:
    body = _update(models, ticket, 0.5)
    key = layout.update_key(ticket.client_id, ticket.number)
    etag = aws.s3.put_object(Bucket=names.updates_bucket, Key=key, Body=body)["ETag"]
    return UpdateEvent(names.updates_bucket, key, len(body), etag.strip('"'), uploaded_at=now)


def _one_version(stack: Any, experiment: str) -> tuple[BufferStore, ModelStore]:
    """Version 1 from a buffer of one, stepped by the averager as its Lambda runs it."""
    config = FederationConfig(
        experiment=experiment, mode="buffered", buffer_size=1, concurrency=1, selection="random"
    )
    aws, names = stack.clients, stack.names
    stack.put_model(0, {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
    now = time.time()
    _heartbeat(aws, names.clients_table, "a", now=now)
    models = ModelStore(aws.s3, names.models_bucket)
    store = BufferStore(aws.dynamodb, names.rounds_table)
    start_round(aws, names, config, clock=lambda: now)
    (ticket,) = store.training(experiment)
    outcome = Averager(aws, names, config, clock=lambda: now).handle_update(
        _event(aws, names, models, ticket, now)
    )
    assert outcome.result.value == "accepted", outcome
    return store, models


def test_a_region_without_prices_leaves_the_version_written_without_dollars(stack: Any) -> None:
    saved = os.environ["AWS_REGION"]
    os.environ["AWS_REGION"] = "mars-1"  # the function's own region, as Lambda sets it
    try:
        store, models = _one_version(stack, "mars")
    finally:
        os.environ["AWS_REGION"] = saved
    buffer = store.buffer("mars", 1)
    assert buffer is not None and buffer.status is BufferState.CLOSED
    assert models.has_model(1) and (store.pool("mars") or buffer).version == 1  # type: ignore[union-attr]
    cost = buffer.summary["cost"]
    assert cost["usd"] is None and "no prices for region 'mars-1'" in cost["unpriced"]
    assert cost["usage"]["lambda_invocations"] == {"initiator": 1, "averager": 1}
    assert buffer.summary["pool_counts"]["answered"] == 1  # the next version counts from here


def test_pricing_that_fails_never_keeps_a_version_from_being_written(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, Any]:
        raise ArithmeticError("the estimate broke")

    monkeypatch.setattr(pricing, "version_cost_summary", broken)
    store, models = _one_version(stack, "broken")
    buffer = store.buffer("broken", 1)
    assert buffer is not None and buffer.status is BufferState.CLOSED
    assert models.has_model(1) and (store.pool("broken") or buffer).version == 1  # type: ignore[union-attr]
    assert buffer.summary["cost"] == {
        "usd": None,
        "unpriced": "ArithmeticError: the estimate broke",
    }
    assert buffer.summary["pool_counts"]["issued"] == 1
