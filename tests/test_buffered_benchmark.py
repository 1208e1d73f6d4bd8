"""The buffered benchmark steps as the averager does: its ``Run.step`` over a buffer's updates
gives the tensors the averager wrote for that buffer, bit for bit (benchmarks/buffered.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sfl.core.config import FederationConfig
from sfl.learning import codec
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.state.buffers import BufferState, BufferStore, Ticket
from sfl.state.model_store import ModelStore
from tests.conftest import Stack
from tests.test_buffered import _event, _heartbeat, _update

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark() -> Iterator[ModuleType]:
    """benchmarks/buffered.py as its command imports it (its folder on the path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import buffered

        yield buffered
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_benchmarks_step_is_the_averagers(stack: Stack, benchmark: ModuleType) -> None:
    """A buffer of three updates from versions 0 and 1, one of them clipped to the buffer's
    norm bound, polynomial staleness weights, a counter tensor: the same model."""
    config = FederationConfig(
        experiment="bench",
        mode="buffered",
        buffer_size=3,
        concurrency=3,
        max_staleness=3,
        selection="random",
    )
    aws, names = stack.clients, stack.names
    stack.put_model(0, {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.tensor([7])})
    now = time.time()
    clock = lambda: now  # noqa: E731
    _heartbeat(aws, names.clients_table, "a", "b", "c", now=now)
    models = ModelStore(aws.s3, names.models_bucket)
    store = BufferStore(aws.dynamodb, names.rounds_table)
    start_round(aws, names, config, clock=clock)
    tickets = store.training("bench")
    one = Averager(aws, names, config.replace(buffer_size=1), clock=clock)
    one.handle_update(_event(aws, names, models, tickets[0], 0.5, now))  # version 1
    start_round(aws, names, config, clock=clock)
    (fresh,) = [t for t in store.training("bench") if t.base_version == 1]
    answers: list[tuple[Ticket, float]] = [(tickets[1], 0.25), (tickets[2], -0.5), (fresh, 3.0)]
    averager = Averager(aws, names, config, clock=clock)
    for ticket, shift in answers:
        outcome = averager.handle_update(_event(aws, names, models, ticket, shift, now))
        assert outcome.result.value == "accepted", outcome
    buffer = store.buffer("bench", 2)
    assert buffer is not None and buffer.status is BufferState.CLOSED
    assert buffer.summary["staleness"] == {"0": 1, "1": 2}
    assert buffer.summary["clipped"]  # the 3.0 shift is more than twice the median change

    def model(version: int) -> dict[str, torch.Tensor]:
        return codec.decode(models.model_bytes(version))

    def trained(ticket: Ticket, shift: float) -> dict[str, torch.Tensor]:
        return codec.decode(_update(models, ticket, shift))

    run = benchmark.Run(None, None, {}, {}, config, "random")
    stepped = run.step(
        model(1),
        [
            (model(t.base_version), trained(t, shift), 10 + t.number, 1 - t.base_version)
            for t, shift in answers
        ],
    )

    written = model(2)
    assert stepped.keys() == written.keys()
    for name, tensor in written.items():
        assert stepped[name].dtype == tensor.dtype
        assert torch.equal(stepped[name], tensor), name
    assert not torch.equal(written["w"], model(1)["w"])  # the step moved the model
