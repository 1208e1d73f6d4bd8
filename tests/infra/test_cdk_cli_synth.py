"""The real CDK CLI (npm aws-cdk, pinned in package.json) synthesizes the app offline.

No AWS credentials, no Docker (the averager's image is only staged at synth, built at
deploy), no network: the pinned CLI comes from node_modules (``npm ci``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from stack_template import REPO_ROOT

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def pinned_cli_version() -> str:
    version: str = json.loads((REPO_ROOT / "package.json").read_text())["devDependencies"][
        "aws-cdk"
    ]
    return version


def run_cdk(tmp_path: Path, *args: str, app: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """The pinned CLI in ``app`` (default: this repository, the reference app)."""
    cli = REPO_ROOT / "node_modules" / ".bin" / "cdk"
    if not cli.exists():
        pytest.fail("the pinned CDK CLI is not installed: run 'npm ci' in the repository")
    home = tmp_path / "home"  # no ~/.aws: no credentials, no profile
    home.mkdir(exist_ok=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "CDK_")) and key != "HOME"
    }
    env.update(
        HOME=str(home),
        AWS_EC2_METADATA_DISABLED="true",
        CDK_DISABLE_VERSION_CHECK="1",
        JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20",
        # If synthesis ever needed Docker, it would run this and fail.
        CDK_DOCKER=str(tmp_path / "no-docker-here"),
        # An app's cdk.json runs "python3 app.py": the Python the framework is installed in.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return subprocess.run(
        [str(cli), *args, "--no-notices"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_is_the_pinned_version(tmp_path):
    result = run_cdk(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(pinned_cli_version() + " ")


def test_cli_synthesizes_offline_without_docker_or_credentials(tmp_path):
    out = tmp_path / "cdk.out"
    result = run_cdk(tmp_path, "synth", "--quiet", "--output", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    template = json.loads((out / "Sfl-Federation.template.json").read_text())
    assert "AWS::GreengrassV2::ComponentVersion" in {
        r["Type"] for r in template["Resources"].values()
    }
    manifest = json.loads((out / "Sfl-Federation.assets.json").read_text())
    (image,) = manifest["dockerImages"].values()
    context = out / image["source"]["directory"]
    staged = sorted(p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file())
    # The staged build context holds the averager's files and the packages it runs; this
    # reference app names no code of its own, so app/ holds only the (empty) manifest.
    assert {p for p in staged if "/" not in p} == {
        "Dockerfile",
        "handler.py",
        "requirements.txt",
        "app-requirements.txt",
    }
    assert {p for p in staged if p.startswith("app/")} == {"app/sfl-app.json"}
    # The image holds the packages the averager runs, and never local mode (moto, attacks),
    # the CLI, the operator tools or the build tools.
    packages = {p.split("/")[1] for p in staged if p.startswith("sfl/") and p.count("/") > 1}
    assert packages == {"core", "state", "learning", "server"}
    assert not any(
        p.startswith(("sfl/local/", "sfl/cli/", "sfl/ops/", "sfl/build/")) for p in staged
    )
    assert sum((context / p).stat().st_size for p in staged) < 2 * MiB
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 20 * MiB


def test_a_bad_context_value_fails_synth_naming_key_value_and_allowed(tmp_path):
    result = run_cdk(
        tmp_path,
        "synth",
        "--quiet",
        "--output",
        str(tmp_path / "cdk.out"),
        "--context",
        'sfl_infra={"schedule_minutes": 0}',
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "sfl_infra.schedule_minutes" in output
    assert "0 is not allowed" in output
    assert "an integer from 1 to 1440" in output


def test_an_app_made_by_new_synthesizes_with_its_task_on_devices_and_in_the_averager(tmp_path):
    """``sfl new`` outside this repository, then the real CLI's ``cdk synth`` in its folder:
    the app's own package rides in the device artifact and the averager's build context."""
    from sfl.build.new_app import create_app

    app = create_app(tmp_path / "leaf-scanner")
    out = tmp_path / "cdk.out"
    result = run_cdk(tmp_path, "synth", "--quiet", "--output", str(out), app=app.root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((out / "LeafScanner-Federation.assets.json").read_text())
    (image,) = manifest["dockerImages"].values()
    context = out / image["source"]["directory"]
    assert (context / "app" / "leaf_scanner" / "task.py").read_bytes() == (
        app.root / "leaf_scanner" / "task.py"
    ).read_bytes()
    (client_zip,) = [
        out / f["source"]["path"]
        for f in manifest["files"].values()
        if f["source"]["path"].endswith(".zip")
    ]
    with zipfile.ZipFile(client_zip) as archive:
        assert "leaf_scanner/task.py" in archive.namelist()
    template = json.loads((out / "LeafScanner-Federation.template.json").read_text())
    recipe = next(
        r["Properties"]["InlineRecipe"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::GreengrassV2::ComponentVersion"
    )
    assert "leaf_scanner.task:Task" in json.dumps(recipe)
