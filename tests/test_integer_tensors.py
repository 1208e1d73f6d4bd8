"""A device's integer tensors (BatchNorm's ``num_batches_tracked``) never reach the next model.

Integer tensors cannot be clipped, and acceptance's no-change and finiteness checks look at
float tensors only, so before issue 20 one device of four that set its counter to 2**62 made
the next model's 2**61 (under FedAvg). Now the averager's reader gives every rule the base
model's value for them: each rule's next model keeps the base model's counter, whatever one
device sends, streamed, chunked or summed in shards.
"""

from __future__ import annotations

import pytest
import torch

from sfl.core.params import RULES
from sfl.local.lambdas import local_shard_invoker
from sfl.server.averager import Averager
from sfl.server.initiator import start_round
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import Stack
from tests.test_deadlines import _deliver
from tests.test_hostile_devices import _model

COUNTER = "bn.num_batches_tracked"
HONEST = ("h1", "h2", "h3")


def _batchnorm_model() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(3, 2))
    model.add_module("bn", torch.nn.BatchNorm1d(2))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert state[COUNTER].dtype == torch.int64
    return state


BASE = _batchnorm_model()


def _trained(by: float, counter: int) -> dict[str, torch.Tensor]:
    """What a device sends after training: float tensors moved, the counter as it says."""
    out = {n: t + by if t.dtype.is_floating_point else t.clone() for n, t in BASE.items()}
    out[COUNTER] = torch.tensor(counter, dtype=torch.int64)
    return out


def _round(stack: Stack, **config: object) -> tuple[Averager, RoundStore]:
    stack.config = stack.config.replace(quorum="all_answered", **config)
    stack.put_model(0, BASE)
    stack.register(*HONEST, "attacker")
    assert start_round(stack.clients, stack.names, stack.config).started
    invoke = local_shard_invoker() if config.get("aggregation_shard_above") else None
    averager = Averager(stack.clients, stack.names, stack.config, invoke_shard=invoke)
    return averager, RoundStore(stack.clients.dynamodb, stack.names.rounds_table)


@pytest.mark.parametrize(
    ("rule", "extra"),
    [(rule, {}) for rule in RULES]
    + [("fedavg", {"aggregation_shard_above": 2, "aggregation_shard_size": 2})],
    ids=[*RULES, "fedavg-sharded"],
)
def test_one_devices_huge_counter_leaves_the_next_models_counter_the_base_models(
    stack: Stack, rule: str, extra: dict[str, int]
) -> None:
    averager, store = _round(stack, aggregation=rule, **extra)
    for i, client in enumerate(HONEST):
        event = stack.upload_update(client, 1, _trained(0.1 * (i + 1), counter=7))
        assert _deliver(averager, event) == "accepted"
    hostile = stack.upload_update("attacker", 1, _trained(0.2, counter=2**62))
    assert _deliver(averager, hostile) == "accepted"

    round_ = store.get("test", 1)
    assert round_ is not None and round_.status is RoundState.CLOSED
    model = _model(stack, 1)
    assert model[COUNTER].dtype == torch.int64
    assert int(model[COUNTER]) == int(BASE[COUNTER]) == 0
    for name, value in model.items():
        if value.dtype.is_floating_point:
            assert bool(torch.isfinite(value).all()), name
            assert float((value - BASE[name]).abs().max()) <= 0.3 + 1e-6, name
