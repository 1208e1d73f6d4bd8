"""The initiator starts at most one round, picks only active clients, and says why not."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from pathlib import Path

from sfl.core import layout
from sfl.core.selection import Candidate, clients_to_pick, select_fast_clients
from sfl.local.lambdas import LocalFunction
from sfl.server.initiator import start_round
from sfl.state.rounds import RoundStore
from tests.conftest import TINY_MODEL, Stack


def test_first_round_picks_registered_clients_and_publishes_the_assignment(stack: Stack) -> None:
    stack.put_model(0, TINY_MODEL)
    stack.register("c1", "c2", "c3")

    result = start_round(stack.clients, stack.names, stack.config)

    assert result.started and result.round == 1
    assignment = json.loads(
        stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY)[
            "Body"
        ].read()
    )
    assert assignment["round"] == 1 and assignment["status"] == "OPEN"
    assert sorted(assignment["selected"]) == ["c1", "c2", "c3"]
    assert assignment["model_key"] == layout.model_key(0)
    assert assignment["train_config"]["local_epochs"] == stack.config.local_epochs


def test_no_model_or_no_clients_means_no_round_and_a_reason(stack: Stack) -> None:
    stack.register("c1")
    no_model = start_round(stack.clients, stack.names, stack.config)
    stack.put_model(0, TINY_MODEL)
    no_clients = start_round(stack.clients, stack.names, stack.config.replace(min_clients=5))

    assert not no_model.started and "version 0" in no_model.reason
    assert (
        not no_clients.started
        and "1 active client(s), fewer than min_clients=5" in no_clients.reason
    )
    assert RoundStore(stack.clients.dynamodb, stack.names.rounds_table).latest("test") is None


def test_two_concurrent_initiator_invocations_start_one_round(stack: Stack) -> None:
    stack.put_model(0, TINY_MODEL)
    stack.register("c1", "c2")
    initiator = LocalFunction("initiator")
    barrier = threading.Barrier(2)
    results: list[dict[str, object]] = []

    def invoke() -> None:
        barrier.wait()
        results.append(initiator.invoke({}))

    threads = [threading.Thread(target=invoke) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(bool(r["started"]) for r in results) == [False, True]
    rounds = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).history("test")
    assert [r.round for r in rounds] == [1]


def test_while_a_round_is_open_a_tick_starts_nothing(stack: Stack) -> None:
    stack.put_model(0, TINY_MODEL)
    stack.register("c1")
    start_round(stack.clients, stack.names, stack.config)

    again = start_round(stack.clients, stack.names, stack.config)

    assert not again.started and again.reason == "round 1 is OPEN"
    assert again.open_for_seconds is not None and again.open_for_seconds >= 0


def test_fast_clients_favours_low_turnaround_and_never_picks_nobody() -> None:
    candidates = [Candidate("fast", 1.0), Candidate("slow", 20.0), Candidate("new", None)]
    rng = random.Random(0)
    picks = [select_fast_clients(candidates, 1, rng)[0] for _ in range(2000)]

    assert picks.count("fast") > 5 * picks.count("slow")
    assert clients_to_pick(1, fraction=0.01, clients_per_round=0) == 1
    assert clients_to_pick(10, fraction=0.5, clients_per_round=0) == 5
    assert clients_to_pick(10, fraction=0.5, clients_per_round=3) == 3
    assert clients_to_pick(0, fraction=1.0, clients_per_round=0) == 0


def test_initiator_handler_imports_no_torch() -> None:
    handler = Path(__file__).resolve().parents[1] / "lambdas" / "initiator" / "handler.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('h', {str(handler)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "heavy = {'torch', 'numpy', 'safetensors'}\n"
        "print(','.join(sorted(n for n in sys.modules if n.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_round_whose_initiator_died_mid_creation_is_abandoned_after_the_grace(
    stack: Stack,
) -> None:
    """Round item written, one slot of two, no ready flag, no assignment: the next run
    leaves it alone within the grace period, then abandons it and starts the next round."""
    import time
    from dataclasses import replace

    from sfl.state.rounds import SLOT_WRITE_GRACE_SECONDS, Round, RoundState

    stack.put_model(0, TINY_MODEL)
    stack.register("c1", "c2")
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    now = time.time()
    half = Round(
        experiment="test",
        round=1,
        status=RoundState.OPEN,
        base_version=0,
        selected=("c1", "c2"),
        created_at=now,
        deadline_at=now + 600,
        train_config={},
    )
    assert store._create_item(replace(half, slots_ready=False), None)
    store.write_slots(half, ("c1",))

    waiting = start_round(stack.clients, stack.names, stack.config, clock=lambda: now + 60)
    assert not waiting.started and waiting.round == 1
    assert "Contents" not in stack.clients.s3.list_objects_v2(
        Bucket=stack.names.models_bucket, Prefix=layout.ASSIGNMENT_KEY
    )  # never published
    later = now + SLOT_WRITE_GRACE_SECONDS + 1
    result = start_round(stack.clients, stack.names, stack.config, clock=lambda: later)
    assert result.started and result.round == 2
    first = store.get("test", 1)
    assert first is not None and first.status is RoundState.ABANDONED and first.answers == {}
    second = store.get("test", 2)
    assert second is not None and second.slots_ready and sorted(second.selected) == ["c1", "c2"]


def test_an_open_round_is_republished_only_when_the_assignment_is_not_its_own(
    stack: Stack,
) -> None:
    stack.put_model(0, TINY_MODEL)
    stack.register("c1", "c2")
    assert start_round(stack.clients, stack.names, stack.config).started
    s3 = stack.clients.s3
    s3.delete_object(Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY)

    again = start_round(stack.clients, stack.names, stack.config)

    assert not again.started
    body = s3.get_object(Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY)["Body"]
    assignment = json.loads(body.read())
    assert assignment["round"] == 1 and sorted(assignment["selected"]) == ["c1", "c2"]
