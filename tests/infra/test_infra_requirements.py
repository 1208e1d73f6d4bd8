"""`make synth/deploy/destroy` install requirements/infra.txt only: the CDK app synthesizes
with no torch, numpy or CUDA in reach, and every distribution it imports comes from that set."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from stack_template import REPO_ROOT

pytestmark = pytest.mark.slow

INFRA_REQUIREMENTS = REPO_ROOT / "requirements" / "infra.txt"
HEAVY = ("torch", "torchvision", "numpy", "safetensors", "sklearn", "matplotlib", "moto")
# Not in the infra set, but imported by botocore whenever installed (its optional CRT support,
# botocore.compat's HAS_CRT); the test venv has it for the edge client's Greengrass IPC, an
# infra-only venv has not, and synthesis works without it, as here.
ABSENT_FROM_INFRA = ("awscrt",)
# Distributions a fresh venv has before anything is installed.
VENV_BASICS = {"pip", "setuptools"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path) -> dict[str, str]:
    """name -> version of a requirements file, following ``-r`` includes."""
    found: dict[str, str] = {}
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            found.update(pins((requirements.parent / line[3:].strip()).resolve()))
            continue
        name, _, version = line.partition("==")
        found[normalized(name)] = version.strip()
    return found


def closure(names: set[str]) -> set[str]:
    """The distributions and everything they require (extras aside), as installed here."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement whose marker excludes this Python (not installed here)
        seen.add(name)
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            match = _NAME.match(requirement)
            if match:
                todo.append(normalized(match[1]))
    return seen


@pytest.fixture(scope="module")
def synth_imports(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Synthesize the app in a process where the heavy packages cannot be imported; returns
    the distributions whose modules it imported."""
    probe = textwrap.dedent(
        f"""
        import importlib.metadata, json, sys
        for heavy in {HEAVY + ABSENT_FROM_INFRA!r}:
            sys.modules[heavy] = None
        from pathlib import Path
        from aws_cdk import App
        from infra.stack import build_app
        context = json.loads(Path("cdk.json").read_text())["context"]
        app = App(context=context, outdir=sys.argv[1])
        build_app(app, source_root=Path.cwd())
        app.synth()
        top = {{name.split(".")[0] for name, m in list(sys.modules.items()) if m is not None}}
        owners = importlib.metadata.packages_distributions()
        print("DISTRIBUTIONS " + json.dumps(sorted({{d for t in top for d in owners.get(t, [])}})))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path_factory.mktemp("cdk.out"))],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("DISTRIBUTIONS ")]
    return {normalized(d) for d in json.loads(line.removeprefix("DISTRIBUTIONS "))}


def test_the_app_synthesizes_without_torch_and_imports_only_the_infra_set(synth_imports):
    project = normalized(importlib.metadata.distribution("serverless-federated-learning").name)
    allowed = closure(set(pins(INFRA_REQUIREMENTS))) | VENV_BASICS | {project}
    assert synth_imports - allowed == set()


def test_the_infra_set_holds_no_training_stack():
    assert not {"torch", "torchvision", "numpy", "scikit-learn", "moto", "matplotlib"} & set(
        closure(set(pins(INFRA_REQUIREMENTS)))
    )


def test_infra_pins_agree_with_the_project_s_constraints():
    constraints = pins(REPO_ROOT / "requirements" / "constraints.txt")
    assert {n: constraints.get(n) for n in pins(INFRA_REQUIREMENTS)} == pins(INFRA_REQUIREMENTS)


@pytest.mark.parametrize("target", ["synth", "deploy", "destroy"])
def test_make_target_installs_the_infra_set_only(target: str):
    plan = subprocess.run(
        ["make", "--dry-run", "--always-make", target],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    installs = [ln for ln in plan.splitlines() if " install " in ln]
    assert any("-r requirements/infra.txt" in ln for ln in installs), plan
    assert not any(
        f"requirements/{heavy}.txt" in ln for ln in installs for heavy in ("runtime", "dev")
    ), plan
