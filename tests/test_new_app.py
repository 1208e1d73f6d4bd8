"""``sfl new``: a user's app, made outside this repository, runs as written.

The app is created in a temporary folder; its own test passes, ``sfl simulate`` in its folder
trains its task (named by import path in its cdk.json) and learns. (Its ``cdk synth`` through
the real CDK CLI: tests/infra/test_cdk_cli_synth.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sfl.build.new_app import NewAppError, create_app, package_name, stack_prefix
from sfl.cli.main import main


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_new_writes_an_app_whose_cdk_json_names_its_task(tmp_path: Path, capsys) -> None:
    assert main(["new", str(tmp_path / "Leaf-Scanner")]) == 0
    root = tmp_path / "Leaf-Scanner"
    context = json.loads((root / "cdk.json").read_text())["context"]
    assert context["sfl"] == {"experiment": "leaf_scanner", "task": "leaf_scanner.task:Task"}
    assert context["sfl_infra"] == {"stack_prefix": "LeafScanner"}
    assert (root / "leaf_scanner" / "task.py").is_file()
    assert (root / "app.py").read_text() == (Path(__file__).parents[1] / "app.py").read_text()
    out = capsys.readouterr().out
    assert "task leaf_scanner.task:Task" in out and "sfl simulate" in out


def test_new_refuses_a_folder_in_use_and_a_shadowing_package(tmp_path: Path, capsys) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    assert main(["new", str(tmp_path / "used")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["new", str(tmp_path / "x"), "--package", "json"]) == 2
    assert "'json' would shadow the framework or the standard library" in capsys.readouterr().err
    with pytest.raises(NewAppError, match="not allowed; allowed: a Python identifier"):
        create_app(tmp_path / "y", package="my-app")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    ("folder", "package", "prefix"),
    [
        ("my-app", "my_app", "MyApp"),
        ("2go", "app_2go", "App2go"),
        ("Ünïcode app", "n_code_app", "NCodeApp"),
    ],
)
def test_names_come_from_the_folder(folder: str, package: str, prefix: str) -> None:
    assert package_name(Path(folder)) == package
    assert stack_prefix(package) == prefix


@pytest.mark.slow
def test_an_app_made_by_new_passes_its_own_test_and_task_check_and_learns_in_simulate(
    tmp_path: Path,
) -> None:
    root = tmp_path / "my-app"
    assert main(["new", str(root)]) == 0
    tested = run(["-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "2 passed" in tested.stdout
    checked = run(["-m", "sfl.cli.main", "task", "check"], cwd=root)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "task my_app.task:Task: ok" in checked.stdout
    simulated = run(
        [
            "-m",
            "sfl.cli.main",
            "simulate",
            "--clients",
            "4",
            "--rounds",
            "3",
            "--set",
            "local_epochs=1",
        ],
        cwd=root,
    )
    assert simulated.returncode == 0, simulated.stdout[-3000:] + simulated.stderr[-3000:]
    assert "task my_app.task:Task" in simulated.stdout
    history = json.loads((root / "runs" / "latest" / "history.json").read_text())
    assert history["task"] == "my_app.task:Task"
    final = history["rounds"][-1]["accuracy"]
    assert final > max(0.5, history["initial_accuracy"] + 0.3), history["rounds"]


def test_simulate_takes_the_apps_cdk_json_but_not_its_device_deadlines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's configuration is what the folder deploys, minus the minutes a real device's
    round lasts; the command line still wins, and the folder's packages import."""
    from sfl.cli.main import build_parser
    from sfl.cli.simulate import config_keys

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    app = tmp_path / "app"
    app.mkdir()
    context = {"sfl": {"lr": 0.2, "local_epochs": 3, "round_deadline_seconds": 900}}
    (app / "cdk.json").write_text(json.dumps({"context": context}))
    args = build_parser().parse_args(["simulate", "--app", str(app), "--set", "local_epochs=1"])
    keys = config_keys(args)
    assert keys["lr"][0] == "0.2" and "cdk.json" in keys["lr"][1]
    assert keys["local_epochs"] == ("1", "--set")
    assert "round_deadline_seconds" not in keys
    assert str(app.resolve()) == sys.path[0]
    assert os.environ["PYTHONPATH"] == str(app.resolve())
