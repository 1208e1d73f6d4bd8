"""``sfl new DIR``: a user's app as a project of its own, which runs as written.

The project holds the user's task (from :mod:`sfl.build.app_template`), a ``cdk.json`` whose
``sfl.task`` names it by import path, the framework's own ``app.py`` (the CDK app, which ships
the app's code wherever it runs: :mod:`sfl.build.app_code`), ``requirements-task.txt`` for
what the task needs beyond the framework, a test of the task against the contract, and a
README with the few commands. The framework stays a dependency (installed from its checkout),
never a fork.
"""

from __future__ import annotations

import json
import keyword
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfl.build import app_code, artifact
from sfl.core.deployment import CONTEXT_KEY as INFRA_CONTEXT_KEY
from sfl.core.deployment import FEDERATION_CONTEXT_KEY as SFL_CONTEXT_KEY

TEMPLATE = Path(__file__).resolve().parent / "app_template"
#: The task's module in the app's package, and the class cdk.json names.
TASK_MODULE, TASK_CLASS = "task", "Task"


class NewAppError(ValueError):
    """The app cannot be created there, or under that name; the message says why."""


@dataclass(frozen=True)
class NewApp:
    root: Path
    package: str
    stack_prefix: str
    files: tuple[str, ...]

    @property
    def task(self) -> str:
        return f"{self.package}.{TASK_MODULE}:{TASK_CLASS}"


def package_name(directory: Path) -> str:
    """The folder's name as a Python package: ASCII lower case and digits, '_' for the rest."""
    name = re.sub(r"[^a-z0-9]+", "_", directory.name.lower()).strip("_")
    if not name or name[0].isdigit():
        name = f"app_{name}"
    return name


def stack_prefix(package: str) -> str:
    """The package's name as a stack prefix: ``my_app`` -> ``MyApp`` (at most 32 characters)."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", package) if w]
    prefix = "".join(w[:1].upper() + w[1:] for w in words)
    if not prefix or not prefix[0].isalpha():
        prefix = f"App{prefix}"
    return prefix[:32]


def refuse_package_name(package: str) -> None:
    """A package name the app may use: an identifier that shadows nothing the places run."""
    if not package.isidentifier() or keyword.iskeyword(package):
        raise NewAppError(f"package name {package!r} is not allowed; allowed: a Python identifier")
    if package in app_code.FRAMEWORK_NAMES or package in sys.stdlib_module_names:
        raise NewAppError(
            f"package name {package!r} would shadow the framework or the standard library; "
            "choose another with --package"
        )


def create_app(
    directory: Path, *, package: str | None = None, source_root: Path = artifact.SOURCE_ROOT
) -> NewApp:
    """Write a new app into ``directory`` (absent or empty); returns what was written."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise NewAppError(f"{directory} exists and is not an empty folder")
    package = package or package_name(directory.resolve())
    refuse_package_name(package)
    prefix = stack_prefix(package)
    task = f"{package}.{TASK_MODULE}:{TASK_CLASS}"
    files: dict[str, str] = {
        f"{package}/__init__.py": f'"""{package}: a federated learning app."""\n',
        f"{package}/{TASK_MODULE}.py": (TEMPLATE / "task.py").read_text(encoding="utf-8"),
        "tests/test_task.py": (TEMPLATE / "test_task.py").read_text(encoding="utf-8"),
        "app.py": (source_root / "app.py").read_text(encoding="utf-8"),
        "cdk.json": json.dumps(_cdk_json(source_root, package, prefix, task), indent=2) + "\n",
        app_code.APP_REQUIREMENTS: (
            "# What the task imports beyond the framework (torch, numpy, safetensors), pinned\n"
            "# as name==version: devices and the averager install exactly this.\n"
        ),
        "pyproject.toml": _PYPROJECT.format(package=package),
        ".gitignore": "cdk.out/\nruns/\n__pycache__/\n.pytest_cache/\n",
        "README.md": _README.format(name=directory.name, package=package, prefix=prefix, task=task),
    }
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return NewApp(directory, package, prefix, tuple(sorted(files)))


def _cdk_json(source_root: Path, package: str, prefix: str, task: str) -> dict[str, Any]:
    """The app's cdk.json: its federation and stack, with the framework's feature flags (the
    CDK behaviour the stack is tested with)."""
    ours = json.loads((source_root / "cdk.json").read_text(encoding="utf-8"))
    flags = {k: v for k, v in ours["context"].items() if k.startswith("@")}
    return {
        "app": "python3 app.py",
        "context": {
            SFL_CONTEXT_KEY: {"experiment": package, "task": task},
            INFRA_CONTEXT_KEY: {"stack_prefix": prefix},
            **flags,
        },
    }


_PYPROJECT = """\
[project]
name = "{package}"
version = "0.1.0"
description = "A federated learning app on the sfl framework."
requires-python = ">=3.11"
# The framework, installed from its checkout (pip install -e <checkout>), is a dependency.
dependencies = ["serverless-federated-learning"]

[tool.pytest.ini_options]
pythonpath = ["."]
testpaths = ["tests"]
"""

_README = """\
# {name}

A federated learning app: the model in `{package}/task.py` trains on your devices' own data,
which never leaves them. AWS runs the rounds (Lambda, S3, DynamoDB) and Greengrass ships the
task to the devices, through the `sfl` framework this app depends on.

## Try it (the framework installed, its venv active)

    sfl simulate           # your task on 10 local clients, against a local AWS (moto)
    sfl task check         # your task against the framework's contract, step by step
    pytest                 # the same contract as tests

`sfl simulate` reads this folder's `cdk.json` (context `sfl`), so what you simulate is what
you deploy; `--set KEY=VALUE` changes a key for one run (`sfl config` lists them).

## What is here

| File | What it is |
|---|---|
| `{package}/task.py` | your model, how a device reads its data, trains and scores |
| `cdk.json` | the federation (`sfl`: `task` is `{task}`) and the stack (`sfl_infra`) |
| `app.py` | the CDK app: the framework's stack, shipping this app's code |
| `requirements-task.txt` | what the task imports beyond torch, numpy and safetensors, pinned |
| `tests/test_task.py` | the task against the contract |

## Deploy

    cdk synth              # packages {package} into the device artifact and the averager image
    cdk deploy             # the stack {prefix}-Federation (Docker builds the averager image)

`cdk synth` refuses, with the reason, code that could not run where it is sent: a module-level
import that a device does not have and `requirements-task.txt` does not pin, or a selection
that imports torch (the initiator carries none). The framework's docs/deploy.md has the rest:
bootstrap, the device setup command, what `cdk destroy` leaves.
"""
