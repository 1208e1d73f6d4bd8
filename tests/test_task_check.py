"""``sfl task check`` on tasks a user wrote outside the repository.

The test writes a task module into a temporary directory: a good task passes every step
(exit code 0); a task whose build_model ignores its seed, whose train raises, or whose
evaluate returns NaN fails, naming the step, in one line and without a traceback.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from sfl.cli.main import main

USER_TASKS = textwrap.dedent(
    '''
    """A user's tasks: a linear classifier on points in a CSV file."""

    from pathlib import Path

    import numpy as np
    import torch

    from sfl.learning.tasks.base import ArrayDataset, CentralData, ClientData, Metrics


    def points(n, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, 4)).astype(np.float32)
        return ArrayDataset(x=x, y=(x[:, 0] > 0).astype(np.int64))


    class GoodTask:
        name = "good"

        def build_model(self, seed=0):
            torch.manual_seed(seed)
            return torch.nn.Linear(4, 2)

        def load_central_data(self):
            return CentralData(train=points(200, 0), test=points(50, 1), num_classes=2)

        def load_client_data(self, data_dir):
            rows = np.loadtxt(Path(data_dir) / "points.csv", delimiter=",", dtype=np.float32)
            data = ArrayDataset(x=rows[:, :4], y=rows[:, 4].astype(np.int64))
            return ClientData(train=data, eval=data)

        def train(self, model, data, config, should_stop=lambda: False):
            optimiser = torch.optim.SGD(model.parameters(), lr=config.lr)
            loss = torch.nn.functional.cross_entropy(
                model(torch.from_numpy(data.x)), torch.from_numpy(data.y)
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            return Metrics(loss=loss.item(), accuracy=0.5, num_examples=len(data))

        def evaluate(self, model, data):
            with torch.no_grad():
                logits = model(torch.from_numpy(data.x))
            correct = (logits.argmax(1).numpy() == data.y).mean()
            return Metrics(loss=1.0, accuracy=float(correct), num_examples=len(data))


    class UnseededTask(GoodTask):
        def build_model(self, seed=0):
            return torch.nn.Linear(4, 2)  # a fresh random start every time


    class RaisingTrainTask(GoodTask):
        def train(self, model, data, config, should_stop=lambda: False):
            raise RuntimeError("CUDA is not available\\non this device")


    class NanEvaluateTask(GoodTask):
        def evaluate(self, model, data):
            return Metrics(loss=float("nan"), accuracy=0.5, num_examples=len(data))
    '''
)


@pytest.fixture
def user_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The user's task module, importable as ``user_tasks_for_check``."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "user_tasks_for_check.py").write_text(USER_TASKS)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "user_tasks_for_check", raising=False)
    monkeypatch.chdir(project)  # no cdk.json here: the defaults
    return "user_tasks_for_check"


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str]]:
    """Run the command; its exit code and each step's line by step name."""
    code = main(["task", "check", *args])
    out = capsys.readouterr().out
    lines = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in {"OK", "WARN", "FAIL", "SKIP"}:
            lines[parts[1]] = line
    assert "Traceback" not in out
    return code, lines


def test_a_good_task_passes_every_step(user_tasks: str, capsys: pytest.CaptureFixture[str]):
    code, steps = check(capsys, "--task", f"{user_tasks}:GoodTask")
    assert code == 0
    assert list(steps) == [
        "load", "seed", "data", "train", "evaluate", "safetensors", "device", "averager"
    ]  # fmt: skip
    assert all(line.startswith("OK") for line in steps.values()), steps
    assert "10 parameters" in steps["safetensors"]
    assert "sfl_infra.model_bytes = " in steps["safetensors"]


def test_a_good_task_reads_a_clients_data_directory(
    user_tasks: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    data = tmp_path / "device-data"
    data.mkdir()
    (data / "points.csv").write_text("1,0,0,0,1\n-1,0,0,0,0\n0.5,1,1,1,1\n")
    code, steps = check(capsys, "--task", f"{user_tasks}:GoodTask", "--data", str(data))
    assert code == 0
    assert f"client data in {data}: 3 training and 3 evaluation" in steps["data"]


def test_a_missing_data_directory_fails_the_data_step(
    user_tasks: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    code, steps = check(capsys, "--task", f"{user_tasks}:GoodTask", "--data", str(tmp_path))
    assert code == 1
    assert steps["data"].startswith("FAIL") and "points.csv" in steps["data"]
    assert steps["train"].startswith("SKIP") and steps["evaluate"].startswith("SKIP")
    assert steps["safetensors"].startswith("OK")  # the model itself is still checked


def test_a_build_model_that_ignores_its_seed_fails_the_seed_step(
    user_tasks: str, capsys: pytest.CaptureFixture[str]
):
    code, steps = check(capsys, "--task", f"{user_tasks}:UnseededTask")
    assert code == 1
    assert steps["seed"].startswith("FAIL")
    assert "build_model(seed=0) twice gave different weights" in steps["seed"]


def test_a_train_that_raises_fails_the_train_step_in_one_line(
    user_tasks: str, capsys: pytest.CaptureFixture[str]
):
    code, steps = check(capsys, "--task", f"{user_tasks}:RaisingTrainTask")
    assert code == 1
    assert steps["train"] == (
        "FAIL  train       raised RuntimeError: CUDA is not available on this device"
    )
    assert steps["evaluate"].startswith("SKIP")


def test_an_evaluate_returning_nan_fails_the_evaluate_step(
    user_tasks: str, capsys: pytest.CaptureFixture[str]
):
    code, steps = check(capsys, "--task", f"{user_tasks}:NanEvaluateTask")
    assert code == 1
    assert steps["evaluate"].startswith("FAIL")
    assert "loss is nan, not a finite number" in steps["evaluate"]
    assert steps["train"].startswith("OK")


def test_a_task_that_does_not_import_fails_the_load_step(
    user_tasks: str, capsys: pytest.CaptureFixture[str]
):
    code, steps = check(capsys, "--task", f"{user_tasks}:NoSuchTask")
    assert code == 1
    assert steps["load"].startswith("FAIL") and "NoSuchTask" in steps["load"]
    assert steps["seed"].startswith("SKIP")


def test_the_averager_step_uses_the_projects_cdk_json(
    user_tasks: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    cdk = tmp_path / "project" / "cdk.json"
    cdk.write_text(
        '{"context": {"sfl": {"aggregation": "median", "clients_per_round": 7}, "sfl_infra": {}}}'
    )
    code, steps = check(capsys, "--task", f"{user_tasks}:GoodTask")
    assert code == 0
    assert "7 updates a round, rule 'median'" in steps["averager"]


def test_an_averager_setting_below_the_need_fails_the_averager_step_with_the_numbers(
    user_tasks: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    cdk = tmp_path / "project" / "cdk.json"
    cdk.write_text('{"context": {"sfl": {}, "sfl_infra": {"averager_timeout_seconds": 10}}}')
    code, steps = check(capsys, "--task", f"{user_tasks}:GoodTask")
    assert code == 1
    assert steps["averager"].startswith("FAIL")
    assert "averager_timeout_seconds: 10 s is less than the averager needs" in steps["averager"]
