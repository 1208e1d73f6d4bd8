"""The component as a Greengrass core device runs it, with this test playing the nucleus.

The nucleus's part, done here the way it does it: unpack the artifact zip under
``packages/artifacts-unarchived/<component>/<version>/<zip name>/``; merge the deployment's
configuration over ``DefaultConfiguration``; replace ``{namespace:key}`` placeholders in the
lifecycle; run each step with ``sh -c`` in ``work/<component>`` with its ``Setenv``; give the
process ``AWS_IOT_THING_NAME`` and the token exchange service's
``AWS_CONTAINER_CREDENTIALS_FULL_URI`` + ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` (and no access
keys); stop it with SIGTERM.

Install must not download torch (minutes, gigabytes): the deployment points
``pythonInterpreter`` at this venv's base interpreter and ``extraSitePackages`` at this venv's
site-packages — the knobs a device with preinstalled torch uses — and passes ``--no-index``,
so pip must find every pin already satisfied or fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from edge_client.client import EdgeClient
from edge_client.settings import ClientSettings
from sfl.artifact import build_client_artifact
from sfl.averager import bootstrap_model
from sfl.initiator import start_round
from sfl.local.credentials import CredentialEndpoint
from sfl.local.dispatcher import S3EventDispatcher
from sfl.local.lambdas import LocalFunction
from sfl.recipes import PLACEHOLDER, build_recipe
from sfl.registry import ClientRegistry
from sfl.rounds import RoundState, RoundStore
from sfl.splits import write_client_splits
from sfl.tasks import load_task
from tests.conftest import Stack

COMPONENT = "com.example.sfl.EdgeClient"
THING = "core-device-1"
OTHER_CLIENT = "laptop-1"


def json_pointer(document: Mapping[str, Any], pointer: str) -> Any:
    node: Any = document
    for part in pointer.split("/")[1:]:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def interpolate(value: Any, configuration: Mapping[str, Any], system: Mapping[str, str]) -> Any:
    """Greengrass's placeholder replacement; an unknown placeholder fails the test (the nucleus
    would log it and leave it in place)."""
    if isinstance(value, dict):
        return {k: interpolate(v, configuration, system) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        namespace, key = match[1], match[2]
        if namespace == "configuration":
            found = json_pointer(configuration, key)
            return found if isinstance(found, str) else json.dumps(found)
        return system[f"{namespace}:{key}"]

    return PLACEHOLDER.sub(replace, value)


class Nucleus:
    """One core device's Greengrass root, with the component deployed into it."""

    def __init__(self, root: Path, recipe: dict[str, Any], zip_path: Path) -> None:
        name, version = recipe["ComponentName"], recipe["ComponentVersion"]
        self.root = root
        self.artifacts = root / "packages" / "artifacts" / name / version
        self.unarchived = root / "packages" / "artifacts-unarchived" / name / version
        self.work = root / "work" / name
        self.home = root / "home"  # ggc_user has no real home; keep ~ away from the host's
        for d in (self.artifacts, self.unarchived, self.work, self.home):
            d.mkdir(parents=True)
        shutil.copy(zip_path, self.artifacts / zip_path.name)
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(self.unarchived / zip_path.stem)
        self.recipe = recipe
        self.system = {
            "artifacts:path": str(self.artifacts),
            "artifacts:decompressedPath": str(self.unarchived),
            "work:path": str(self.work),
            "kernel:rootPath": str(root),
            "iot:thingName": THING,
        }

    def lifecycle(self, merge: Mapping[str, str]) -> dict[str, Any]:
        """The Linux manifest's lifecycle with the deployment's configuration merged in."""
        configuration = {**self.recipe["ComponentConfiguration"]["DefaultConfiguration"], **merge}
        (manifest,) = [m for m in self.recipe["Manifests"] if m["Platform"]["os"] == "linux"]
        result: dict[str, Any] = interpolate(manifest["Lifecycle"], configuration, self.system)
        leftovers = PLACEHOLDER.findall(json.dumps(result))
        assert not leftovers, leftovers
        return result

    def environment(self, step: Mapping[str, Any], extra: Mapping[str, str]) -> dict[str, str]:
        """What a lifecycle process sees: a plain system environment, the nucleus's variables,
        then the step's Setenv. Deliberately no AWS credentials of any kind."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "PIP_CONFIG_FILE": os.devnull,  # a device has no pip config of this host's
            "AWS_EC2_METADATA_DISABLED": "true",
            **extra,
            **step.get("Setenv", {}),
        }
        assert not {k for k in env if k.startswith("AWS_") and "KEY" in k}, env
        assert "AWS_SESSION_TOKEN" not in env
        return env


def run_step(
    script: str, cwd: Path, env: Mapping[str, str], *, timeout: float
) -> subprocess.CompletedProcess[str]:
    """A lifecycle step to completion, as the nucleus runs it: ``sh -c`` in the work path."""
    return subprocess.run(
        ["sh", "-c", script],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def project_site_packages() -> str:
    paths = sysconfig.get_paths()
    return ":".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def deployed(tmp_path: Path, stack: Stack) -> Nucleus:
    info = build_client_artifact(tmp_path / "build" / "sfl-edge-client.zip")
    recipe = build_recipe(
        stack.config,
        stack.names,
        region=stack.aws.region,
        component_name=COMPONENT,
        artifact_uri=f"s3://artifact-bucket/edge/{info.archive_name}",
        artifact_sha256=info.sha256,
    )
    return Nucleus(tmp_path / "greengrass", recipe, info.path)


@pytest.mark.parametrize(
    ("merge", "message"),
    [
        ({"systemSitePackages": "yes"}, "systemSitePackages must be true or false"),
        ({"pythonInterpreter": "/bin/false"}, "is not Python 3.10+"),
    ],
)
def test_install_refuses_bad_settings_with_a_clear_message(
    stack: Stack, tmp_path: Path, merge: dict[str, str], message: str
) -> None:
    nucleus = deployed(tmp_path, stack)
    install = nucleus.lifecycle(merge)["Install"]
    failed = run_step(install["Script"], nucleus.work, nucleus.environment(install, {}), timeout=60)
    assert failed.returncode != 0 and message in failed.stderr, failed.stderr
    assert not (nucleus.work / "venv").exists()


@pytest.fixture
def device_data(tmp_path: Path) -> Path:
    task = load_task("digits")
    splits = tmp_path / "splits"
    write_client_splits(task, splits, 2, "iid", seed=3, client_ids=[THING, OTHER_CLIENT])
    return splits


@pytest.mark.slow
def test_component_installs_runs_a_round_with_tes_credentials_and_stops_cleanly(
    stack: Stack, tmp_path: Path, device_data: Path
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    nucleus = deployed(tmp_path, stack)
    # The device's own data, at the default dataDir ("data" under the work path).
    shutil.copytree(device_data / THING, nucleus.work / "data")
    merge = {
        "endpointUrl": stack.aws.endpoint_url,
        "pollSeconds": "0.2",
        "heartbeatSeconds": "1",
        "pythonInterpreter": getattr(sys, "_base_executable", sys.executable),
        "extraSitePackages": project_site_packages(),
        "pipOptions": "--no-index",
    }
    lifecycle = nucleus.lifecycle(merge)
    svcuid = "svcuid-7f1c2e"  # the nucleus gives each component a token; TES checks it
    greengrass_env = {
        "SVCUID": svcuid,
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": svcuid,
        "AWS_IOT_THING_NAME": THING,
        "AWS_REGION": stack.aws.region,
    }

    # --- Install: builds the venv, pip finds every pin satisfied; a second run is a no-op ---
    install = lifecycle["Install"]
    install_env = nucleus.environment(install, greengrass_env)
    t0 = time.monotonic()
    first = run_step(install["Script"], nucleus.work, install_env, timeout=install["Timeout"])
    timings["install"] = time.monotonic() - t0
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Requirement already satisfied: torch==" in first.stdout
    assert "installed" in first.stdout
    again = run_step(install["Script"], nucleus.work, install_env, timeout=60)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr
    changed = nucleus.environment(
        nucleus.lifecycle({**merge, "pipOptions": "--no-index --quiet"})["Install"], greengrass_env
    )
    rebuilt = run_step(install["Script"], nucleus.work, changed, timeout=install["Timeout"])
    assert rebuilt.returncode == 0 and "installed" in rebuilt.stdout, rebuilt.stderr

    # --- the component's code comes from the unpacked artifact, not this checkout ---
    run = lifecycle["Run"]
    origin = subprocess.run(
        [
            str(nucleus.work / "venv" / "bin" / "python"),
            "-c",
            "import edge_client, sfl.codec; print(edge_client.__file__); print(sfl.codec.__file__)",
        ],
        cwd=nucleus.work,
        env=nucleus.environment(run, greengrass_env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert origin.returncode == 0, origin.stderr
    for line in origin.stdout.split():
        assert Path(line).is_relative_to(nucleus.unarchived), line

    # --- Run: the component and an ordinary client answer round 1 together ---
    task = load_task("digits")
    bootstrap_model(stack.clients, stack.names, task.build_model(seed=0).state_dict(), seed=0)
    averager = LocalFunction("averager")
    dispatcher = S3EventDispatcher(
        stack.aws.client("sqs"), stack.deployment.queue_url, averager.invoke
    ).start()
    stop_other = threading.Event()
    other = EdgeClient(
        ClientSettings(
            client_id=OTHER_CLIENT,
            models_bucket=stack.names.models_bucket,
            updates_bucket=stack.names.updates_bucket,
            clients_table=stack.names.clients_table,
            data_dir=device_data / OTHER_CLIENT,
            poll_seconds=0.2,
            heartbeat_seconds=1,
        ),
        stack.aws.clients(),
        task,
        stop=stop_other,
    )
    other_thread = threading.Thread(target=other.run, name=OTHER_CLIENT, daemon=True)
    log_path = tmp_path / f"{COMPONENT}.log"  # /greengrass/v2/logs/<component>.log on a device
    with CredentialEndpoint(token=svcuid) as tes, log_path.open("w") as log:
        run_env = nucleus.environment(
            run, {**greengrass_env, "AWS_CONTAINER_CREDENTIALS_FULL_URI": tes.url}
        )
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["sh", "-c", run["Script"]],
            cwd=nucleus.work,
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            other_thread.start()
            registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None:
                active = {
                    r.client_id
                    for r in registry.active(
                        now=time.time(), active_window_seconds=stack.config.active_window_seconds
                    )
                }
                if active == {THING, OTHER_CLIENT}:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, log_path.read_text()
            timings["component_registered"] = time.monotonic() - t0
            result = start_round(stack.clients, stack.names, stack.config)
            assert result.started and set(result.selected) == {THING, OTHER_CLIENT}, result

            store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
            round_1 = store.get(stack.config.experiment, 1)
            while time.time() < deadline and not (round_1 and round_1.status.finished):
                time.sleep(0.2)
                round_1 = store.get(stack.config.experiment, 1)
            timings["round_closed"] = time.monotonic() - t0
            assert round_1 is not None and round_1.status is RoundState.CLOSED, (
                round_1,
                log_path.read_text(),
            )
            assert set(round_1.accepted) == {THING, OTHER_CLIENT}
        finally:
            stop_other.set()
            proc.send_signal(signal.SIGTERM)  # how the nucleus stops a component
            try:
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
            other_thread.join(timeout=30)
            dispatcher.stop()
        served, refused = tes.served, tes.refused
    output = log_path.read_text()
    assert proc.returncode == 0, output
    assert "client stopped" in output
    assert served >= 1 and refused == 0, (served, refused)
    timings["total"] = time.monotonic() - started
    print(f"nucleus test timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
