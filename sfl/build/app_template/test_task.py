"""The task that cdk.json names keeps the framework's contract (run: ``pytest``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import ArrayDataset, TrainConfig, TrainingTask

APP_ROOT = Path(__file__).resolve().parents[1]


def configured_task() -> TrainingTask:
    context = json.loads((APP_ROOT / "cdk.json").read_text())["context"]
    return load_task(context["sfl"]["task"])


def test_the_same_seed_builds_the_same_weights() -> None:
    task = configured_task()
    first, second = task.build_model(seed=1).state_dict(), task.build_model(seed=1).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_training_step_and_a_score_are_finite() -> None:
    task = configured_task()
    data = task.load_central_data()
    sample = ArrayDataset(x=data.train.x[:64], y=data.train.y[:64])
    model = task.build_model(seed=0)
    trained = task.train(model, sample, TrainConfig(local_epochs=1, lr=0.05, batch_size=16))
    scored = task.evaluate(model, ArrayDataset(x=data.test.x[:64], y=data.test.y[:64]))
    assert math.isfinite(trained.loss) and math.isfinite(scored.loss)
    assert 0.0 <= scored.accuracy <= 1.0
