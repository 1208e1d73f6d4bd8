"""The real CDK CLI (npm aws-cdk, pinned in package.json) synthesizes the app offline.

No AWS credentials, no Docker (the averager's image is only staged at synth, built at
deploy), no network: the pinned CLI comes from node_modules (``npm ci``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


def run_cdk(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not (REPO_ROOT / "node_modules" / ".bin" / "cdk").exists():
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
    )
    return subprocess.run(
        [shutil.which("npx") or "npx", "--no-install", "cdk", *args, "--no-notices"],
        cwd=REPO_ROOT,
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
    # The repository-root build context holds the averager's folder and the core only.
    assert {p.split("/")[0] for p in staged} == {".dockerignore", "lambdas", "sfl"}
    assert {p for p in staged if p.startswith("lambdas/")} == {
        "lambdas/averager/Dockerfile",
        "lambdas/averager/handler.py",
        "lambdas/averager/requirements.txt",
    }
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
