"""A user's app code ships to every place that imports it, and only what can run there.

Each test writes an app in a temporary folder outside this repository, as a user would (a
package with a task, a selection, a quorum, a rule), and plans or synthesizes its stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
from stack_template import Synthesized
from user_app import PILLOW, write_app

from sfl.build.app_code import APP_REQUIREMENTS, AVERAGER, DEVICE, INITIATOR, AppCodeError, plan
from sfl.core.config import FederationConfig


def federation(**keys: Any) -> FederationConfig:
    return FederationConfig.from_mapping(keys, source="test")


def test_each_place_gets_the_app_code_it_imports_with_the_apps_pins(tmp_path: Path) -> None:
    app = write_app(tmp_path, {APP_REQUIREMENTS: f"# for the task\n{PILLOW}\n"})
    code = plan(
        federation(
            task="myapp.task:Task", selection="myapp.selection:pick", quorum="myapp.quorum:half"
        ),
        app_root=app,
    )
    files = {"myapp/__init__.py", "myapp/labels.txt", "myapp/model.py"} | {
        f"myapp/{m}.py" for m in ("quorum", "selection", "task")
    }
    for place in (DEVICE, AVERAGER, INITIATOR):
        assert set(code.for_place(place).files) == files
    assert code.for_place(DEVICE).requirements == (PILLOW,)
    assert code.for_place(AVERAGER).requirements == (PILLOW,)
    assert code.for_place(INITIATOR).requirements == ()  # the initiator installs none
    assert code.for_place(DEVICE).modules == ("myapp.task",)
    assert code.for_place(AVERAGER).modules == ("myapp.task", "myapp.quorum")
    assert code.for_place(INITIATOR).modules == ("myapp.selection",)
    assert code.plugins == {
        "task": "myapp.task:Task",
        "selection": "myapp.selection:pick",
        "quorum": "myapp.quorum:half",
    }


def test_built_in_names_ship_no_app_code(tmp_path: Path) -> None:
    code = plan(federation(task="digits"), app_root=write_app(tmp_path))
    assert all(code.for_place(p).empty for p in (DEVICE, AVERAGER, INITIATOR))


@pytest.mark.parametrize(
    ("keys", "files", "message"),
    [
        ({"task": "myapp.nosuch:Task"}, {}, r"sfl.task 'myapp.nosuch:Task': no module"),
        ({"task": "myapp.task:Nope"}, {}, r"module 'myapp.task' defines no 'Nope'"),
        (
            {"selection": "myapp.greedy:pick"},
            {"myapp/greedy.py": "import torch\n\ndef pick(*a):\n    return []\n"},
            r"sfl.selection .*imports 'torch' at module level; the initiator's zip carries "
            r"boto3 and Powertools only",
        ),
        (
            {"selection": "myapp.greedy:pick"},
            {"myapp/greedy.py": "from sfl.learning import codec\n\ndef pick(*a):\n    return []\n"},
            r"imports 'sfl.learning', which the initiator does not carry",
        ),
        (
            {"task": "myapp.frame:Task"},
            {"myapp/frame.py": "import pandas\n\nclass Task: ...\n"},
            r"imports 'pandas' at module level, which the device does not have: pin its "
            r"distribution in the app's requirements-task.txt",
        ),
        (
            {"task": "json.tool:Task"},
            {"json/__init__.py": "", "json/tool.py": "class Task: ...\n"},
            r"'json' is a standard-library module",
        ),
        (
            {"task": "numpy.mine:Task"},
            {"numpy/__init__.py": "", "numpy/mine.py": "class Task: ...\n"},
            r"'numpy' is the name of a dependency the framework installs",
        ),
        (
            {"task": "edge_client.mine:Task"},
            {"edge_client/__init__.py": "", "edge_client/mine.py": "class Task: ...\n"},
            r"an app package named 'edge_client' would replace the framework's",
        ),
        (
            {"task": "sfl.learning.tasks.digits:DigitsTask", "selection": "sfl.learning.x:y"},
            {},
            r"sfl.selection 'sfl.learning.x:y': the initiator does not carry 'sfl.learning.x'",
        ),
        (
            {"task": "myapp.task:Task"},
            {APP_REQUIREMENTS: "torch==2.0.0\n"},
            r"requirements-task.txt:1: torch==2.0.0 contradicts the framework's torch==2.14.1",
        ),
        (
            {"task": "myapp.task:Task"},
            {APP_REQUIREMENTS: "pandas>=2\n"},
            r"requirements-task.txt:1: 'pandas>=2' is not allowed; allowed: 'name==version'",
        ),
        (
            {"task": "myapp.broken:Task"},
            {"myapp/broken.py": "class Task(:\n"},
            r"broken.py: invalid syntax",
        ),
    ],
)
def test_what_cannot_ship_is_refused_with_the_reason(
    tmp_path: Path, keys: dict[str, str], files: dict[str, str], message: str
) -> None:
    app = write_app(tmp_path, files)
    with pytest.raises(AppCodeError, match=message):
        plan(federation(**keys), app_root=app)


def test_a_pinned_or_optional_or_function_level_import_ships(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        {
            "myapp/images.py": (
                "from PIL import Image\n"  # pinned below
                "try:\n    import pandas\nexcept ImportError:\n    pandas = None\n"
                "class Task:\n    def load(self):\n        import polars\n"
            ),
            APP_REQUIREMENTS: PILLOW + "\n",
        },
    )
    code = plan(federation(task="myapp.images:Task"), app_root=app)
    assert "myapp/images.py" in code.for_place(DEVICE).files


def test_an_import_path_without_an_app_folder_is_refused() -> None:
    with pytest.raises(AppCodeError, match=r"no app folder to ship it from.*sfl new"):
        plan(federation(task="myapp.task:Task"), app_root=None)


def test_the_synthesized_stack_carries_the_app_where_it_runs(
    user_app_synthesized: Synthesized, tmp_path: Path
) -> None:
    stack, assembly = user_app_synthesized.stack, user_app_synthesized.assembly_dir
    manifest = json.loads((assembly / f"{stack.stack_name}.assets.json").read_text())
    sources = [assembly / f["source"]["path"] for f in manifest["files"].values()]

    # The device artifact: our client and the task, and the app's pins after ours.
    (client_zip,) = [p for p in sources if p.name.endswith(".zip")]
    with zipfile.ZipFile(client_zip) as archive:
        names = set(archive.namelist())
        requirements = archive.read("requirements-edge.txt").decode()
    assert {"myapp/task.py", "myapp/model.py", "edge_client/client.py"} <= names
    assert requirements.rstrip().endswith(PILLOW)

    # The initiator's zip: the selection beside the handler, no torch (the destroy clean-up's
    # zip also holds a handler.py, and nothing else).
    (initiator,) = [p for p in sources if (p / "handler.py").is_file() and (p / "sfl").is_dir()]
    assert (initiator / "myapp" / "selection.py").is_file()
    assert not (initiator / "torch").exists()
    # What runs there loads from there alone: the selection in the initiator's zip with
    # torch and numpy unloadable, the task from the device's unpacked artifact and from the
    # averager's image (task root + app/) with scikit-learn unloadable, as neither has it.
    assert (
        run_from(
            [initiator],
            "from sfl.core.selection import get_selection_strategy\n"
            "print(get_selection_strategy('myapp.selection:pick').__module__)",
            blocked=("torch", "numpy", "safetensors"),
        )
        == "myapp.selection"
    )
    unpacked = tmp_path / "device"
    with zipfile.ZipFile(client_zip) as archive:
        archive.extractall(unpacked)
    build = (
        "from sfl.learning.tasks import load_task\n"
        "model = load_task('myapp.task:Task').build_model(seed=0)\n"
        "print(sum(p.numel() for p in model.parameters()))"
    )
    assert run_from([unpacked], build, blocked=("sklearn",)) == "650"

    # The averager's build context: our server packages, the app under app/, its pins.
    (image,) = manifest["dockerImages"].values()
    context_dir = assembly / image["source"]["directory"]
    staged = {p.relative_to(context_dir).as_posix() for p in context_dir.rglob("*") if p.is_file()}
    assert {"app/myapp/task.py", "app/myapp/quorum.py", "app/sfl-app.json"} <= staged
    assert "sfl/server/averager.py" in staged
    assert not any(p.startswith(("sfl/local/", "sfl/cli/", "sfl/build/")) for p in staged)
    assert (context_dir / "app-requirements.txt").read_text().rstrip().endswith(PILLOW)
    app_manifest = json.loads((context_dir / "app" / "sfl-app.json").read_text())
    assert app_manifest["modules"] == ["myapp.task", "myapp.quorum"]
    assert run_from([context_dir / "app", context_dir], build, blocked=("sklearn",)) == "650"


def run_from(path: list[Path], code: str, *, blocked: tuple[str, ...]) -> str:
    """Run ``code`` with only ``path`` (and the installed third-party packages) importable
    for our code and the app's; ``blocked`` modules cannot load. Returns its last line."""
    probe = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        import sfl
        assert sfl.__file__.startswith({str(path[-1])!r}), sfl.__file__
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe + code],
        cwd=path[-1],
        env={
            "PYTHONPATH": os.pathsep.join(map(str, path)),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]
