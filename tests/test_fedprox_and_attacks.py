"""FedProx from the config to the client's loss, and what each new hostile device sends.

FedProx: ``proximal_mu`` reaches the round's assignment, the edge client reads it (refusing
values out of range), and training with it stays closer to the base model. Attacks: the
hostile task's ``train`` turns a model into what that attacker would upload (tensor values).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from edge_client.client import Assignment, AssignmentUnreadable
from sfl.core import layout
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import ArrayDataset, TrainConfig
from sfl.local.attacks import GAUSSIAN_STD, HostileTask
from tests.conftest import Stack
from tests.test_deadlines import _setup


def _distance(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> float:
    state = model.state_dict()
    return math.sqrt(sum(float(((state[k] - base[k]) ** 2).sum()) for k in base))


@pytest.fixture(scope="module")
def small_train() -> ArrayDataset:
    train = load_task("digits").load_central_data().train
    return ArrayDataset(train.x[:120], train.y[:120])


def test_the_proximal_term_keeps_a_client_near_the_base_model(small_train: ArrayDataset) -> None:
    task = load_task("digits")
    distances = {}
    for mu in (0.0, 10.0):
        model = task.build_model(seed=0)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        config = TrainConfig(local_epochs=2, lr=0.05, batch_size=16, seed=1, proximal_mu=mu)
        task.train(model, small_train, config)
        distances[mu] = _distance(model, base)
    assert 0 < distances[10.0] < 0.8 * distances[0.0]


def test_proximal_mu_travels_in_the_assignment(stack: Stack) -> None:
    _setup(stack, "a", proximal_mu=0.25)
    body = stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.ASSIGNMENT_KEY)[
        "Body"
    ].read()

    assignment = Assignment.from_json(body)

    assert json.loads(body)["train_config"]["proximal_mu"] == 0.25
    assert assignment.train_config.proximal_mu == 0.25


def _assignment_with(train_config: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "experiment": "test",
            "round": 3,
            "status": "OPEN",
            "base_version": 2,
            "model_key": layout.model_key(2),
            "selected": ["c1"],
            "created_at": 1.0,
            "deadline_at": 2e9,
            "train_config": {"local_epochs": 2, "lr": 0.05, "batch_size": 16, **train_config},
        }
    ).encode()


def test_an_assignment_without_proximal_mu_means_plain_training() -> None:
    assert Assignment.from_json(_assignment_with({})).train_config.proximal_mu == 0.0


@pytest.mark.parametrize("mu", [-1.0, 1e9, "0.1", True])
def test_a_proximal_mu_out_of_range_or_not_a_number_makes_the_assignment_unreadable(
    mu: object,
) -> None:
    with pytest.raises(AssignmentUnreadable):
        Assignment.from_json(_assignment_with({"proximal_mu": mu}))


# --- attacks -------------------------------------------------------------------------------


def _attacked(attack: str, data: ArrayDataset) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model an attacker would upload, and the base model it was given."""
    task = HostileTask(load_task("digits"), attack)
    model = task.build_model(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    task.train(model, data, TrainConfig(local_epochs=1, lr=0.05, batch_size=16, seed=1))
    return model, base


def test_gaussian_sends_noise_of_the_stated_spread_without_training(
    small_train: ArrayDataset,
) -> None:
    model, base = _attacked("gaussian", small_train)
    noise = torch.cat([(model.state_dict()[k] - base[k]).flatten() for k in base])
    assert abs(float(noise.std()) - GAUSSIAN_STD) < 0.05
    assert abs(float(noise.mean())) < 0.05


def test_alie_sends_a_change_unlike_honest_training(small_train: ArrayDataset) -> None:
    honest_task = load_task("digits")
    honest = honest_task.build_model(seed=0)
    honest_task.train(honest, small_train, TrainConfig(1, 0.05, 16, seed=1))
    model, base = _attacked("alie", small_train)
    change = {k: model.state_dict()[k] - base[k] for k in base}
    honest_change = {k: honest.state_dict()[k] - base[k] for k in base}
    assert _distance(model, base) > 0
    assert any(not torch.allclose(change[k], honest_change[k]) for k in base)


def test_stale_always_trains_from_the_first_model_it_saw(small_train: ArrayDataset) -> None:
    task = HostileTask(load_task("digits"), "stale")
    first = task.build_model(seed=0)
    task.train(first, small_train, TrainConfig(1, 0.05, 16, seed=1))
    later = task.build_model(seed=7)  # a newer global model
    task.train(later, small_train, TrainConfig(1, 0.05, 16, seed=1))

    from_first = load_task("digits").build_model(seed=0)
    load_task("digits").train(from_first, small_train, TrainConfig(1, 0.05, 16, seed=1))
    assert all(torch.allclose(later.state_dict()[k], v) for k, v in from_first.state_dict().items())
