"""Data as devices hold it: the image-folder and tabular tasks, their parameters, and a user's
task that takes parameters, each through the local simulation on tiny data."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_client.settings import parse_settings
from sfl.build import recipes
from sfl.core.config import ConfigError, FederationConfig
from sfl.core.resources import ResourceNames
from sfl.learning.tasks import TaskError, load_task
from sfl.learning.tasks.base import ClientDataError, NoClientDataError
from sfl.local.simulate import SimulationOptions, run_simulation
from sfl.local.synthetic_images import write_image_folders

SMALL_IMAGES = {"architecture": "small_cnn", "num_classes": 4, "image_size": 16}


def _simulate(out: Path, task: str, params: dict[str, object], **options: object) -> dict[str, Any]:
    """Three in-process clients, a few rounds; the history ``sfl simulate`` writes."""
    run_simulation(
        SimulationOptions(
            out=out,
            clients=3,
            task=task,
            partition="iid",
            poll_seconds=0.05,
            task_params=json.dumps(params),
            **options,  # type: ignore[arg-type]
        )
    )
    history: dict[str, Any] = json.loads((out / "history.json").read_text())
    return history


def _blobs_csv(path: Path, rows: int, seed: int = 0) -> None:
    """Three well-separated Gaussian blobs in two features, label last."""
    rng = np.random.default_rng(seed)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["temperature", "vibration", "label"])
        for i in range(rows):
            label = i % 3
            x = centres[label] + rng.normal(0, 0.5, size=2)
            writer.writerow([f"{x[0]:.4f}", f"{x[1]:.4f}", label])


# --- through the simulation ------------------------------------------------------------------


@pytest.mark.slow
def test_image_folder_task_learns_through_the_simulation_from_class_folders(
    tmp_path: Path,
) -> None:
    root = tmp_path / "images"
    write_image_folders(root, num_classes=4, per_class=40, size=16, seed=1)

    history = _simulate(
        tmp_path / "run",
        "image_folder",
        {**SMALL_IMAGES, "root": str(root)},
        rounds=4,
        local_epochs=3,
        lr=0.1,
        batch_size=4,
    )

    rounds = history["rounds"]
    assert all(r["status"] == "CLOSED" for r in rounds)
    assert rounds[-1]["accuracy"] > 0.6  # 4 classes: chance is 0.25
    # each simulated device holds what a real one would: a folder per class of PNG files
    device = tmp_path / "run" / "data" / "client-00"
    assert sorted(p.name for p in device.iterdir() if p.is_dir()) == sorted(
        p.name for p in root.iterdir()
    )
    assert all(p.suffix == ".png" for p in device.rglob("*") if p.is_file())


@pytest.mark.slow
def test_tabular_task_learns_through_the_simulation_from_a_csv_file(tmp_path: Path) -> None:
    central = tmp_path / "central.csv"
    _blobs_csv(central, rows=300)

    history = _simulate(
        tmp_path / "run",
        "tabular",
        {"root": str(central), "label_column": "label", "num_classes": 3, "num_features": 2},
        rounds=3,
        local_epochs=2,
        lr=0.1,
    )

    assert history["rounds"][-1]["accuracy"] > 0.8  # 3 classes: chance is 0.33
    written = (tmp_path / "run" / "data" / "client-01" / "data.csv").read_text().splitlines()
    assert written[0] == "temperature,vibration,label"
    assert len(written) > 50


@pytest.mark.slow
def test_a_users_task_outside_the_repository_takes_task_params_in_the_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "app"
    package.mkdir()
    (package / "widetask.py").write_text(
        textwrap.dedent(
            '''
            from __future__ import annotations

            from dataclasses import dataclass

            from torch import nn

            from sfl.core.params import param
            from sfl.core.task_params import TaskParams
            from sfl.learning.tasks.digits import DigitsTask


            @dataclass(frozen=True, kw_only=True)
            class WideParams(TaskParams):
                """How wide the hidden layer is."""

                width: int = param(32, "hidden units", lo=1, hi=4096)


            class WideDigits(DigitsTask):
                """The digits, through one hidden layer of a configured width."""

                name = "wide_digits"
                Params = WideParams

                def __init__(self, params: WideParams) -> None:
                    self.params = params

                def new_model(self) -> nn.Module:
                    return nn.Sequential(
                        nn.Flatten(),
                        nn.Linear(64, self.params.width),
                        nn.ReLU(),
                        nn.Linear(self.params.width, 10),
                    )
            '''
        )
    )
    monkeypatch.syspath_prepend(str(package))

    task = load_task("widetask:WideDigits", '{"width": 12}')
    assert task.build_model().state_dict()["1.weight"].shape == (12, 64)
    with pytest.raises(TaskError, match=r"'width' = 0 is not allowed; allowed: an integer from 1"):
        load_task("widetask:WideDigits", {"width": 0})
    with pytest.raises(TaskError, match=r"unknown parameter.*'depth'; known: width"):
        load_task("widetask:WideDigits", {"depth": 3})

    history = _simulate(
        tmp_path / "run", "widetask:WideDigits", {"width": 12}, rounds=2, local_epochs=1
    )
    assert history["config"]["task_params"] == '{"width":12}'
    assert all(r["status"] == "CLOSED" for r in history["rounds"])
    assert history["rounds"][-1]["accuracy"] > 0.5


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"architecture": "vgg16"}, "allowed: one of small_cnn, mobilenet_v3_small, "),
        ({"num_classes": 1}, "allowed: an integer from 2 to 100000"),
        ({"mean": [0.5, 0.5]}, "allowed: 3 numbers, one per colour channel"),
        ({"std": [1, 0, 1]}, "each a number from 1e-06 to 10"),
        ({"image_size": "big"}, "allowed: an integer from 8 to 1024"),
        ({"colour": "red"}, "unknown parameter(s) 'colour'; known: architecture"),
        ({"classes": ["a", "b"], "num_classes": 3}, "exactly num_classes names"),
    ],
)
def test_config_refuses_bad_image_folder_params_saying_what_is_allowed(
    params: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match="config key 'task_params': task 'image_folder'") as e:
        FederationConfig.from_mapping({"task": "image_folder", "task_params": params})
    assert says in str(e.value)


def test_config_refuses_tabular_params_without_a_feature_count() -> None:
    with pytest.raises(ConfigError, match="'feature_columns' and 'num_features' are both unset"):
        FederationConfig(task="tabular", task_params='{"num_classes": 3}')
    with pytest.raises(ConfigError, match=r"'file' = '\.\./x\.csv' is not allowed"):
        FederationConfig(task="tabular", task_params='{"num_features": 2, "file": "../x.csv"}')


def test_task_params_are_checked_without_torch_and_kept_as_one_text() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from sfl.core.config import FederationConfig as F; "
        "c = F.from_mapping({'task': 'image_folder', 'task_params': "
        "{'num_classes': 5, 'architecture': 'resnet18'}}); "
        "print(c.task_params, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ['{"architecture":"resnet18","num_classes":5}', "False"]


def test_a_task_without_params_refuses_some_and_keeps_working_without() -> None:
    with pytest.raises(ConfigError, match="task 'digits': unknown parameter"):
        FederationConfig(task="digits", task_params='{"width": 3}')
    with pytest.raises(TaskError, match="takes no parameters"):
        load_task("sfl.learning.tasks.digits:DigitsTask", {"width": 3})
    assert load_task("digits", "{}").name == "digits"


def test_the_device_reads_task_params_from_its_component_configuration(tmp_path: Path) -> None:
    config = FederationConfig(
        task="image_folder", task_params='{"num_classes": 5, "architecture": "resnet18"}'
    )
    names = ResourceNames(
        models_bucket="m", updates_bucket="u", clients_table="c", rounds_table="r"
    )
    env = {
        **recipes.stack_settings(config, names, region="eu-west-1"),
        "SFL_CLIENT_ID": "core-1",
        "SFL_DATA_DIR": str(tmp_path),
    }
    assert env["SFL_TASK_PARAMS"] == config.task_params

    settings = parse_settings([], env)
    assert settings.task_params == config.task_params
    task = load_task(settings.task, settings.task_params)
    assert task.build_model().fc.out_features == 5  # type: ignore[union-attr]

    with pytest.raises(SystemExit):  # argparse's error: the device does not start
        parse_settings([], {**env, "SFL_TASK_PARAMS": '{"architecture": "vgg16"}'})


def test_named_architectures_build_untrained_with_the_class_count() -> None:
    import torch

    for architecture, classes in (("mobilenet_v3_small", 7), ("resnet18", 3)):
        task = load_task("image_folder", {"architecture": architecture, "num_classes": classes})
        model = task.build_model(seed=0)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, classes)
        again = task.build_model(seed=0).state_dict()
        assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    resnet = load_task("image_folder", {"architecture": "resnet18", "num_classes": 1000})
    assert sum(p.numel() for p in resnet.build_model().parameters()) == 11_689_512


# --- a device's files ------------------------------------------------------------------------


def test_image_folder_reads_a_device_folder_afresh_and_keeps_an_image_in_its_split(
    tmp_path: Path,
) -> None:
    write_image_folders(tmp_path, num_classes=4, per_class=10, size=20, seed=2)
    task = load_task("image_folder", {**SMALL_IMAGES, "eval_fraction": 0.3})

    first = task.load_client_data(tmp_path)
    assert first.train.x.shape[1:] == (3, 16, 16)  # resized to image_size
    assert len(first.train) + len(first.eval) == 40
    (tmp_path / "03-yellow-cross" / "note.txt").write_text("not an image")
    (tmp_path / "03-yellow-cross" / "broken.png").write_bytes(b"\x89PNG half written")
    write_image_folders(tmp_path / "more", num_classes=4, per_class=3, size=20, seed=3)
    for image in (tmp_path / "more").rglob("*.png"):
        image.rename(tmp_path / image.parent.name / f"new-{image.name}")
    (tmp_path / "more").rename(tmp_path / ".more")  # hidden: not a class

    second = task.load_client_data(tmp_path)
    assert len(second.train) + len(second.eval) == 52  # the new images count; others skipped
    assert len(second.eval) >= len(first.eval)
    assert set(np.unique(second.train.y)) == {0, 1, 2, 3}


def test_image_folder_labels_follow_classes_when_a_device_lacks_some(tmp_path: Path) -> None:
    write_image_folders(tmp_path, num_classes=3, per_class=4, size=16)
    classes = ["00-red-circle", "01-green-square", "02-blue-triangle", "03-yellow-cross"]
    names = sorted(p.name for p in tmp_path.iterdir())
    task = load_task("image_folder", {**SMALL_IMAGES, "classes": classes, "eval_fraction": 0})
    data = task.load_client_data(tmp_path)
    assert sorted(set(data.train.y.tolist())) == [classes.index(n) for n in names]

    with pytest.raises(ClientDataError, match=r"holds 3 class folder.*num_classes is 4"):
        load_task("image_folder", SMALL_IMAGES).load_client_data(tmp_path)


def test_missing_or_empty_data_gives_a_clear_error(tmp_path: Path) -> None:
    images = load_task("image_folder", SMALL_IMAGES)
    with pytest.raises(NoClientDataError, match="does not exist; expected one folder per class"):
        images.load_client_data(tmp_path / "absent")
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()
    with pytest.raises(NoClientDataError, match="holds no image files in its class folders"):
        images.load_client_data(tmp_path)

    table = load_task("tabular", {"num_features": 2})
    with pytest.raises(NoClientDataError, match=r"data\.csv does not exist"):
        table.load_client_data(tmp_path)
    (tmp_path / "data.csv").write_text("temperature,vibration,label\n")
    with pytest.raises(NoClientDataError, match="holds a header and no rows"):
        table.load_client_data(tmp_path)
    (tmp_path / "data.csv").write_text("")
    with pytest.raises(NoClientDataError, match="is empty"):
        table.load_client_data(tmp_path)


def test_bad_csv_rows_are_reported_with_their_line_numbers(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(
        "temperature,vibration,label\n"
        "1.0,2.0,0\n"
        "1.5,oops,1\n"  # line 3
        "\n"
        "2.0,3.0\n"  # line 5
        "nan,1.0,0\n"  # line 6
        "1.0,1.0,7\n"  # line 7
        "1.0,1.0,0.5\n"  # line 8
    )
    task = load_task("tabular", {"num_features": 2, "num_classes": 3})

    with pytest.raises(ClientDataError) as e:
        task.load_client_data(tmp_path)

    message = str(e.value)
    assert "5 bad row(s)" in message
    assert "line 3: not a finite number in column(s) vibration" in message
    assert "line 5: 2 fields, the header has 3" in message
    assert "line 6: not a finite number in column(s) temperature" in message
    assert "line 7: label '7' is not an integer from 0 to 2" in message
    assert "line 8: label '0.5'" in message
    assert "line 2" not in message


def test_tabular_reads_named_columns_in_any_order_and_appended_rows(tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text("label,site,vibration,temperature\n1,9,0.5,20\n0,9,0.25,21\n")
    task = load_task(
        "tabular",
        {
            "file": "readings.csv",
            "feature_columns": ["temperature", "vibration"],
            "eval_fraction": 0,
        },
    )
    data = task.load_client_data(tmp_path)
    assert data.train.x.tolist() == [[20.0, 0.5], [21.0, 0.25]]
    assert data.train.y.tolist() == [1, 0]

    with path.open("a") as f:
        f.write("1,9,0.7,19\n")
    assert len(task.load_client_data(tmp_path).train) == 3


def test_synthetic_image_folders_are_reproducible_and_name_classes_in_order(
    tmp_path: Path,
) -> None:
    first = write_image_folders(tmp_path / "a", num_classes=12, per_class=2, size=12, seed=5)
    write_image_folders(tmp_path / "b", num_classes=12, per_class=2, size=12, seed=5)

    names = [c.name for c in first]
    assert names == sorted(names) and len(set(names)) == 12
    assert len({(c.shape, c.colour) for c in first}) == 12
    for image in (tmp_path / "a").rglob("*.png"):
        assert (
            image.read_bytes() == (tmp_path / "b" / image.relative_to(tmp_path / "a")).read_bytes()
        )


def test_the_dataset_images_command_writes_class_folders(tmp_path: Path) -> None:
    from sfl.cli.main import main

    assert main(["dataset", "images", "--out", str(tmp_path), "--classes", "3",
                 "--per-class", "2", "--size", "16"]) == 0  # fmt: skip
    assert sorted(len(list(p.iterdir())) for p in tmp_path.iterdir()) == [2, 2, 2]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=st.sampled_from('0123456789.,-e"\n\r abxnaif'), max_size=300))
def test_any_csv_text_loads_or_is_refused_with_a_client_data_error(
    tmp_path: Path, text: str
) -> None:
    (tmp_path / "data.csv").write_text(text, encoding="utf-8")
    task = load_task("tabular", {"feature_columns": ["a", "b"], "label_column": "x"})
    try:
        data = task.load_client_data(tmp_path)
    except ClientDataError:
        return
    assert data.train.x.shape[1:] == (2,) and np.isfinite(data.train.x).all()
    assert set(data.train.y.tolist()) <= {0, 1}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=2_000))
def test_any_bytes_in_an_image_file_are_skipped_not_raised(tmp_path: Path, blob: bytes) -> None:
    write_image_folders(tmp_path, num_classes=4, per_class=1, size=16)
    (tmp_path / "00-red-circle" / "odd.png").write_bytes(blob)
    data = load_task("image_folder", {**SMALL_IMAGES, "eval_fraction": 0}).load_client_data(
        tmp_path
    )
    assert len(data.train) in (4, 5)


def test_split_dataset_writes_each_device_a_csv_and_refuses_bad_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sfl.cli.main import main

    _blobs_csv(tmp_path / "central.csv", rows=60)
    params = {"root": str(tmp_path / "central.csv"), "num_features": 2, "num_classes": 3}
    out = tmp_path / "splits"
    split = ["split-dataset", "--task", "tabular", "--clients", "2", "--partition", "iid"]

    assert main([*split, "--task-params", json.dumps(params), "--out", str(out)]) == 0
    for client in ("client-00", "client-01"):
        rows = (out / client / "data.csv").read_text().splitlines()
        assert rows[0] == "temperature,vibration,label" and len(rows) > 10

    bad = json.dumps({**params, "hidden": [0]})
    assert main([*split, "--task-params", bad, "--out", str(out)]) == 2
    assert "parameter 'hidden' = [0] is not allowed" in capsys.readouterr().err


def test_cdk_json_with_a_bad_task_parameter_is_refused_as_cdk_synth_reads_it(
    tmp_path: Path,
) -> None:
    from sfl.core.deployment import StackConfig

    cdk_json = tmp_path / "cdk.json"
    sfl = {"task": "image_folder", "task_params": {"architecture": "resnet18", "num_classes": 3}}
    cdk_json.write_text(json.dumps({"app": "python3 app.py", "context": {"sfl": sfl}}))
    assert StackConfig.from_cdk_json(cdk_json).federation.task_params == (
        '{"architecture":"resnet18","num_classes":3}'
    )

    sfl["task_params"] = {"architecture": "resnet18", "image_size": 4}
    cdk_json.write_text(json.dumps({"app": "python3 app.py", "context": {"sfl": sfl}}))
    with pytest.raises(ConfigError, match="'image_size' = 4 is not allowed; allowed: an integer"):
        StackConfig.from_cdk_json(cdk_json)
