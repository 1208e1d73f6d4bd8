"""The component as a Greengrass core device runs it, with this test playing the nucleus.

What the nucleus does, as its source (aws-greengrass/aws-greengrass-nucleus) does it:

- **Artifacts** (``ComponentManager``, ``Permissions.setArtifactPermission``,
  ``RunWithPathOwnershipHandler``): the zip under ``packages/artifacts/<name>/<version>/``,
  unpacked under ``packages/artifacts-unarchived/<name>/<version>/<zip stem>/``; files
  ``0440`` for ``Read: OWNER``, directories ``0755``; everything below the version directories
  owned by the component's user and group; the work path ``work/<name>`` owned by them too.
- **Configuration** (``KernelConfigResolver.resolveConfigurationToApply``): the running
  configuration, minus the deployment's reset paths, then the new version's
  ``DefaultConfiguration`` merged *under* it (timestamp 1: it only fills missing keys), then
  the deployment's merge; placeholders interpolated into the lifecycle.
- **Steps** (``UnixPlatform.SudoDecorator``, ``ShDecorator``, ``ShellRunner``):
  ``sudo -n -E -H -u <user> -g <group> -- sh -c <script>`` in the work path, with the
  nucleus's variables (``SVCUID``, ``AWS_CONTAINER_AUTHORIZATION_TOKEN``,
  ``AWS_CONTAINER_CREDENTIALS_FULL_URI``, ``AWS_IOT_THING_NAME``, ``AWS_REGION``) and the step's
  ``Setenv``. sudo's default policy then removes ``PYTHONPATH``, ``LD_*`` and friends.
- **Stop** (``UnixExec.close``): SIGTERM to the process and its children, 5 s of grace, then
  SIGKILL.

Run as root (as CI is), steps go through the real ``sudo`` as an unprivileged user this test
creates and removes. Without root the nucleus would not switch users, and without ``sudo``
installed the test says so loudly and applies sudo's documented default environment policy
itself (``.ci/run`` installs sudo, so CI takes the real path).

Install must not download torch (minutes, gigabytes): the deployment points
``pythonInterpreter`` at a system Python of this venv's version and ``extraSitePackages`` at
this venv's site-packages — the knobs a device with preinstalled torch uses — and passes
``--no-index``, so pip must find every pin already satisfied or fail. Where Install's own
logic is the subject (torch from its own index, a wheel bundle, a resumed install), small
stand-in wheels play the real ones.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from edge_client.client import EdgeClient
from edge_client.settings import ClientSettings
from sfl.build.artifact import build_client_artifact, build_wheel_bundle
from sfl.build.recipes import PLACEHOLDER, SUDO_REMOVED_VARIABLES, WheelBundle, build_recipe
from sfl.core.config import FederationConfig
from sfl.core.resources import ResourceNames
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.local.credentials import TES_PATH, CredentialEndpoint
from sfl.local.dispatcher import S3EventDispatcher
from sfl.local.lambdas import LocalFunction
from sfl.server.averager import bootstrap_model
from sfl.server.initiator import start_round
from sfl.state.registry import ClientRegistry
from sfl.state.rounds import RoundState, RoundStore
from tests.conftest import Stack
from tests.test_recipes import _fake_wheel, fake_device_wheels

COMPONENT = "com.example.sfl.EdgeClient"
THING = "core-device-1"
OTHER_CLIENT = "laptop-1"
GRACE_SECONDS = 5  # UnixExec: gracefulShutdownTimeout
SVCUID = "svcuid-7f1c2e"  # the nucleus gives each component a token; TES checks it


# --- the component's user and how steps run as it ---------------------------------------------


def sudo_default_policy(env: Mapping[str, str], home: str) -> dict[str, str]:
    """What sudo's default policy leaves of an environment with -E -H (sudo -V as root:
    'Environment variables to remove', values starting '()', HOME set to the target's)."""
    kept = {
        name: value
        for name, value in env.items()
        if not any(fnmatch.fnmatchcase(name, p) for p in SUDO_REMOVED_VARIABLES)
        and not value.startswith("()")
    }
    return {**kept, "HOME": home}


@dataclasses.dataclass
class StepRunner:
    """Runs lifecycle steps as the nucleus does: through sudo as the component's user."""

    user: str
    group: str
    home: str
    uid: int
    gid: int
    sudo: bool  # False: this test applies sudo's policy itself (and drops privileges if root)

    def command(self, argv: list[str]) -> list[str]:
        if not self.sudo:
            return argv
        return ["sudo", "-n", "-E", "-H", "-u", self.user, "-g", self.group, "--", *argv]

    def popen_options(self, env: Mapping[str, str]) -> dict[str, Any]:
        if self.sudo:
            return {"env": dict(env)}
        options: dict[str, Any] = {"env": sudo_default_policy(env, self.home)}
        if os.geteuid() == 0:
            options.update(user=self.uid, group=self.gid, extra_groups=[])
        return options

    def run(
        self, script: str, cwd: Path, env: Mapping[str, str], *, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(["sh", "-c", script]),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            **self.popen_options(env),
        )

    def start(self, script: str, cwd: Path, env: Mapping[str, str], log: Any) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(["sh", "-c", script]),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            **self.popen_options(env),
        )

    def own(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


def _loud(message: str) -> None:
    warnings.warn(message, stacklevel=2)
    print(f"\n*** {message} ***", file=sys.__stderr__, flush=True)


@pytest.fixture(scope="module")
def greengrass_root() -> Iterator[Path]:
    """A root the component's user can traverse (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="sfl-greengrass-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def runner(greengrass_root: Path) -> Iterator[StepRunner]:
    """The component's user: created (and removed after) when the test runs as root."""
    if os.geteuid() != 0:
        _loud(
            "not root: lifecycle steps run as the current user, as the nucleus does for its "
            "own user; sudo's default environment policy is applied by this test"
        )
        me = pwd.getpwuid(os.getuid())
        yield StepRunner(
            me.pw_name, grp.getgrgid(me.pw_gid).gr_name, me.pw_dir, me.pw_uid, me.pw_gid, False
        )
        return
    has_sudo = shutil.which("sudo") is not None
    if not has_sudo:
        _loud(
            "sudo is not installed: the test applies sudo's documented default environment "
            "policy itself instead of running steps through sudo (apt-get install sudo, as "
            ".ci/run does, to take the real path)"
        )
    name = f"sflgg{secrets.token_hex(3)}"
    home = greengrass_root / "home" / name
    home.parent.mkdir()
    home.parent.chmod(0o755)
    subprocess.run(["groupadd", "--system", name], check=True)
    try:
        subprocess.run(
            ["useradd", "--system", "--gid", name, "--create-home", "--home-dir", str(home),
             "--shell", "/bin/sh", name],
            check=True,
        )  # fmt: skip
        try:
            entry = pwd.getpwnam(name)
            yield StepRunner(name, name, str(home), entry.pw_uid, entry.pw_gid, has_sudo)
        finally:
            subprocess.run(["userdel", name], check=False)
    finally:  # userdel may have removed the group already
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def test_sudo_removes_pythonpath_even_with_preserve_env(
    runner: StepRunner, greengrass_root: Path
) -> None:
    """The platform fact the recipe is built around (and the fallback policy reproduces)."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": "/opt/from-setenv",
        "LD_LIBRARY_PATH": "/opt/lib",
        "SFL_TASK": "digits",
    }
    done = runner.run(
        'echo "${PYTHONPATH-removed} ${LD_LIBRARY_PATH-removed} $SFL_TASK $(id -un)"',
        greengrass_root,
        env,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["removed", "removed", "digits", runner.user]


# --- the nucleus --------------------------------------------------------------------------------


def json_pointer_remove(document: dict[str, Any], pointer: str) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    node: Any = document
    for part in parents:
        node = node.get(part, {})
    if isinstance(node, dict):
        node.pop(last, None)


def _fill_missing(running: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    for key, value in defaults.items():
        if key not in running:
            running[key] = copy.deepcopy(value)
        elif isinstance(running[key], dict) and isinstance(value, Mapping):
            _fill_missing(running[key], value)


def _merge_over(running: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(running.get(key), dict):
            _merge_over(running[key], value)
        else:
            running[key] = copy.deepcopy(value)


def resolve_configuration(
    running: Mapping[str, Any] | None,
    defaults: Mapping[str, Any],
    merge: Mapping[str, Any] | None = None,
    reset: tuple[str, ...] = (),
) -> dict[str, Any]:
    """KernelConfigResolver.resolveConfigurationToApply: running values survive, a new
    version's defaults only fill keys that are missing, the deployment's merge wins."""
    config = copy.deepcopy(dict(running or {}))
    for pointer in reset:
        if pointer == "":
            config = {}
            break
        json_pointer_remove(config, pointer)
    _fill_missing(config, defaults)
    _merge_over(config, merge or {})
    return config


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
            node: Any = configuration
            for part in key.split("/")[1:]:
                node = node[part]
            return node if isinstance(node, str) else json.dumps(node)
        return system[f"{namespace}:{key}"]

    return PLACEHOLDER.sub(replace, value)


# --- platform: which manifest a device runs -----------------------------------------------------


def greengrass_architecture(os_arch: str) -> str:
    """PlatformResolver.getArchInfo (aws-greengrass-nucleus, src/main/java/com/aws/greengrass/
    config/PlatformResolver.java): the JVM's ``os.arch`` as Greengrass names it."""
    arch = os_arch.lower()
    if arch in ("x86_64", "amd64"):
        return "amd64"
    if arch in ("i386", "x86"):
        return "x86"
    if "arm" in arch:
        return "arm"
    if arch == "aarch64":
        return "aarch64"
    return "unknown"


def device_platform() -> dict[str, str]:
    """This machine as the nucleus detects it (a 64-bit JVM reports uname's machine)."""
    import platform

    return {"os": "linux", "architecture": greengrass_architecture(platform.machine())}


def _attribute_satisfied(name: str, label: str | None, template: str | None) -> bool:
    # PlatformHelper.isAttributeSatisfied (aws-greengrass-component-common,
    # src/main/java/com/amazon/aws/iot/greengrass/component/common/PlatformHelper.java)
    if template is None or template == "*":
        return True
    if not label:
        return False
    if len(template) >= 2 and template.startswith("/") and template.endswith("/"):
        return re.fullmatch(template[1:-1], label) is not None  # Java's String.matches
    if name in ("os", "architecture") and template in ("all", "any"):
        return True
    if not re.match(r"[a-zA-Z0-9]", template):
        return False
    return template == label


def find_best_match(
    device: Mapping[str, str], manifests: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """PlatformHelper.findBestMatch: the first manifest whose every Platform attribute the
    device satisfies (no Platform is a wildcard); None, and Greengrass refuses the component
    ("does not claim platform compatibility", ComponentServiceHelper), when none does."""
    for manifest in manifests:
        requirement = manifest.get("Platform") or {}
        if all(_attribute_satisfied(k, device.get(k), v) for k, v in requirement.items()):
            return manifest
    return None


class Nucleus:
    """One core device's Greengrass root; deploys component versions into it."""

    def __init__(self, root: Path, runner: StepRunner) -> None:
        self.root = root
        self.runner = runner
        self.configuration: dict[str, Any] | None = None  # the running configuration
        self.recipe: dict[str, Any] = {}
        self.work = root / "work" / COMPONENT
        self.work.mkdir(parents=True)
        self.work.chmod(0o700)
        runner.own(self.work)

    def _place(self, zip_path: Path, version: str) -> None:
        artifacts = self.root / "packages" / "artifacts" / COMPONENT / version
        unarchived = self.root / "packages" / "artifacts-unarchived" / COMPONENT / version
        for version_dir in (artifacts, unarchived):
            version_dir.mkdir(parents=True, exist_ok=True)
            for d in [version_dir, *version_dir.parents]:
                if d == self.root.parent:
                    break
                d.chmod(0o755)  # the version directories stay root's
        shutil.copy(zip_path, artifacts / zip_path.name)
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(unarchived / zip_path.stem)
        for top in (artifacts, unarchived):
            for path in top.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o440)
                self.runner.own(path)

    def deploy(
        self,
        recipe: dict[str, Any],
        zips: list[Path],
        *,
        merge: Mapping[str, Any] | None = None,
        reset: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Put a version in place; returns its lifecycle, resolved against the configuration."""
        version = recipe["ComponentVersion"]
        for path in zips:
            self._place(path, version)
        defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
        self.configuration = resolve_configuration(self.configuration, defaults, merge, reset)
        self.recipe = recipe
        system = {
            "artifacts:path": str(self.root / "packages" / "artifacts" / COMPONENT / version),
            "artifacts:decompressedPath": str(
                self.root / "packages" / "artifacts-unarchived" / COMPONENT / version
            ),
            "work:path": str(self.work),
            "kernel:rootPath": str(self.root),
            "iot:thingName": THING,
        }
        manifest = find_best_match(device_platform(), recipe["Manifests"])
        assert manifest is not None, f"no manifest for {device_platform()}: Greengrass refuses"
        lifecycle: dict[str, Any] = interpolate(manifest["Lifecycle"], self.configuration, system)
        leftovers = PLACEHOLDER.findall(json.dumps(lifecycle))
        assert not leftovers, leftovers
        return lifecycle

    def environment(self, step: Mapping[str, Any], extra: Mapping[str, str]) -> dict[str, str]:
        """What the nucleus hands sudo: its own plain environment, its variables, the step's
        Setenv. Deliberately no AWS credentials of any kind."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "PIP_CONFIG_FILE": os.devnull,  # a device has no pip config of this host's
            "SVCUID": SVCUID,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": SVCUID,
            "AWS_IOT_THING_NAME": THING,
            **extra,
            **step.get("Setenv", {}),
        }
        assert not {k for k in env if k.startswith("AWS_") and "KEY" in k}, env
        assert "AWS_SESSION_TOKEN" not in env
        return env

    def install(self, lifecycle: Mapping[str, Any], *, timeout: float | None = None) -> Any:
        step = lifecycle["Install"]
        return self.runner.run(
            step["Script"],
            self.work,
            self.environment(step, {}),
            timeout=timeout or step["Timeout"],
        )

    def start(self, lifecycle: Mapping[str, Any], extra: Mapping[str, str], log: Any) -> Any:
        step = lifecycle["Run"]
        return self.runner.start(step["Script"], self.work, self.environment(step, extra), log)

    def stop(self, proc: subprocess.Popen[str]) -> bool:
        """UnixExec.close: SIGTERM to the process tree (through the user decorator, as the
        nucleus does), up to GRACE_SECONDS, then SIGKILL. True if it had to kill."""
        pids = [*_descendants(proc.pid), proc.pid]
        for pid in pids:
            # As the component's user: that fails for sudo's own (root) processes, as it does
            # on a device; the command itself gets the signal.
            subprocess.run(
                self.runner.command(["kill", "-TERM", str(pid)]), capture_output=True, check=False
            )
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        survivors = [pid for pid in pids if _alive(pid)] if proc.poll() is None else []
        for pid in survivors:
            _signal(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return bool(survivors)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


# --- a token exchange service that can go down -------------------------------------------------


class FlakyTokenExchange:
    """A TES that can go down and come back on the same URL: a loopback front for
    ``CredentialEndpoint`` (which checks the component's token) that stops listening
    while down, as a restarting or disconnected nucleus would."""

    def __init__(self, endpoint: CredentialEndpoint) -> None:
        self.endpoint = endpoint
        self._server: ThreadingHTTPServer | None = None
        self._port = 0
        self.up()
        self.url = f"http://127.0.0.1:{self._port}{TES_PATH}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        target = self.endpoint.url

        class Forward(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                # target is CredentialEndpoint's own http://127.0.0.1 URL, never another scheme
                request = urllib.request.Request(  # noqa: S310
                    target, headers={"Authorization": self.headers.get("Authorization", "")}
                )
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                        status, body = response.status, response.read()
                except urllib.error.HTTPError as e:
                    status, body = e.code, b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Forward

    def up(self) -> None:
        assert self._server is None
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), self._handler())
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def close(self) -> None:
        if self._server is not None:
            self.down()


# --- shared set-up ------------------------------------------------------------------------------


def usable_interpreter(runner: StepRunner) -> str:
    """A Python of this venv's version the component's user may run (this venv's base may sit
    under root's private home)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        getattr(sys, "_base_executable", sys.executable),
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
    ]
    for candidate in candidates:
        done = runner.run(
            f'"{candidate}" -c "import sys, venv, ensurepip; print(sys.version_info[:2])"',
            Path("/"),
            {"PATH": os.environ["PATH"]},
            timeout=60,
        )
        if done.returncode == 0 and done.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    pytest.fail(f"no Python {version} with venv and ensurepip that {runner.user} may run")


def project_site_packages() -> str:
    """This venv's site-packages, and wherever else the device's pins are installed for the
    tests (a directory on PYTHONPATH holding awsiotsdk, say)."""
    import importlib.metadata

    paths = sysconfig.get_paths()
    found = [paths["purelib"], paths["platlib"]]
    for name in ("awsiotsdk", "awscrt"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(str(importlib.metadata.distribution(name).locate_file("")))
    return ":".join(dict.fromkeys(found))


def client_zip(directory: Path) -> tuple[Path, str]:
    info = build_client_artifact(directory / "sfl-edge-client.zip")
    return info.path, info.sha256


def recipe_for(
    config: FederationConfig,
    names: ResourceNames,
    region: str,
    sha: str,
    *,
    wheel_bundle: WheelBundle | None = None,
) -> dict[str, Any]:
    return build_recipe(
        config,
        names,
        region=region,
        component_name=COMPONENT,
        artifact_uri="s3://artifact-bucket/edge/sfl-edge-client.zip",
        artifact_sha256=sha,
        wheel_bundle=wheel_bundle,
    )


def deploy_client(
    nucleus: Nucleus, stack: Stack, tmp_path: Path, merge: Mapping[str, str]
) -> dict[str, Any]:
    """Deploy this repository's client as the stack's component, with ``merge`` merged into
    its configuration; the component's lifecycle as the nucleus resolved it."""
    zip_path, sha = client_zip(tmp_path)
    return nucleus.deploy(
        recipe_for(stack.config, stack.names, "eu-west-1", sha), [zip_path], merge=merge
    )


@pytest.fixture
def nucleus(greengrass_root: Path, runner: StepRunner) -> Iterator[Nucleus]:
    root = greengrass_root / f"device-{secrets.token_hex(4)}"
    root.mkdir()
    root.chmod(0o755)
    yield Nucleus(root, runner)
    shutil.rmtree(root, ignore_errors=True)


# --- configuration: the nucleus's merge -------------------------------------------------------


def test_a_new_version_s_defaults_never_overwrite_running_values() -> None:
    running = {"dataDir": "/mnt/fl", "pollSeconds": "10.0"}
    resolved = resolve_configuration(running, {"dataDir": "data", "pollSeconds": "2.0", "x": "1"})
    assert resolved == {"dataDir": "/mnt/fl", "pollSeconds": "10.0", "x": "1"}
    reset = resolve_configuration(running, {"dataDir": "data"}, reset=("/dataDir",))
    assert reset["dataDir"] == "data"


def test_an_upgrade_reaches_a_running_device_with_the_stack_s_new_settings(
    stack: Stack, nucleus: Nucleus, tmp_path: Path
) -> None:
    """Version A ran with the old stack's names (and a device merge); version B comes from a
    redeploy whose table and task changed. B's Run environment has B's values."""
    zip_path, sha = client_zip(tmp_path)
    old = ResourceNames(
        models_bucket="sfl-models-old",
        updates_bucket="sfl-updates-old",
        clients_table="sfl-clients-old",
        rounds_table="",
    )
    lifecycle_a = nucleus.deploy(
        recipe_for(FederationConfig(task="mnist"), old, "eu-west-1", sha),
        [zip_path],
        merge={"dataDir": "/mnt/fl-data"},
    )
    assert lifecycle_a["Run"]["Setenv"]["SFL_CLIENTS_TABLE"] == "sfl-clients-old"

    lifecycle_b = nucleus.deploy(
        recipe_for(FederationConfig(task="digits"), stack.names, "eu-west-1", sha), [zip_path]
    )
    env = lifecycle_b["Run"]["Setenv"]
    assert env["SFL_CLIENTS_TABLE"] == stack.names.clients_table
    assert env["SFL_MODELS_BUCKET"] == stack.names.models_bucket
    assert env["SFL_TASK"] == "digits"
    assert env["SFL_DATA_DIR"] == "/mnt/fl-data"  # the device's own setting is kept


# --- Install's logic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("merge", "message"),
    [
        ({"systemSitePackages": "yes"}, "systemSitePackages must be true or false"),
        ({"pythonInterpreter": "/bin/false"}, "is not Python 3.10+"),
    ],
)
def test_install_refuses_bad_settings_with_a_clear_message(
    stack: Stack, nucleus: Nucleus, tmp_path: Path, merge: dict[str, str], message: str
) -> None:
    lifecycle = deploy_client(nucleus, stack, tmp_path, merge)
    failed = nucleus.install(lifecycle, timeout=120)
    assert failed.returncode != 0 and message in failed.stderr, failed.stderr
    assert not (nucleus.work / "venv").exists()


def simple_index(root: Path, wheels: list[Path]) -> str:
    """A PEP 503 index on disk (file:// URL) serving these wheels."""
    for wheel in wheels:
        project = root / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        project.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, project / wheel.name)
        links = "".join(f'<a href="{w.name}">{w.name}</a>' for w in sorted(project.glob("*.whl")))
        (project / "index.html").write_text(f"<html><body>{links}</body></html>")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root.as_uri()


def _installed(nucleus: Nucleus) -> dict[str, str]:
    listed = nucleus.runner.run(
        f'"{nucleus.work}/venv/bin/python" -m pip list --format json --disable-pip-version-check',
        nucleus.work,
        {"PATH": os.environ["PATH"], "PIP_CONFIG_FILE": os.devnull},
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    return {d["name"].lower(): d["version"] for d in json.loads(listed.stdout)}


@pytest.mark.slow
def test_install_takes_torch_and_torchvision_alone_from_the_cpu_index(
    stack: Stack, nucleus: Nucleus, runner: StepRunner, tmp_path: Path
) -> None:
    """PyPI's torch and torchvision (stand-ins needing a CUDA package nobody has) are never
    chosen."""
    stand_ins = fake_device_wheels(tmp_path / "pypi-wheels")
    for wheel in stand_ins.glob("torch-*"):
        wheel.unlink()
    _fake_wheel(stand_ins, "torch", "2.14.1", requires=["nvidia-cuda-stand-in==13"])
    _fake_wheel(stand_ins, "sympy-stand-in", "1.0")  # a dependency of torch, on PyPI only
    pypi = simple_index(nucleus.root / "pypi", sorted(stand_ins.iterdir()))
    for wheel in stand_ins.glob("torchvision-*"):
        wheel.unlink()
    _fake_wheel(stand_ins, "torchvision", "0.29.1", requires=["nvidia-cuda-stand-in==13"])
    cpu_torch = _fake_wheel(
        tmp_path / "cpu-wheels", "torch", "2.14.1+cpu", requires=["sympy-stand-in>=1"]
    )
    cpu_vision = _fake_wheel(tmp_path / "cpu-wheels", "torchvision", "0.29.1+cpu")
    cpu = simple_index(nucleus.root / "cpu", [cpu_torch, cpu_vision])
    lifecycle = deploy_client(
        nucleus,
        stack,
        tmp_path,
        {
            "pythonInterpreter": usable_interpreter(runner),
            "pipOptions": f"--index-url {pypi}",
            "torchIndexUrl": cpu,
        },
    )
    done = nucleus.install(lifecycle)
    assert done.returncode == 0, done.stdout + done.stderr
    installed = _installed(nucleus)
    assert installed["torch"] == "2.14.1+cpu"
    assert installed["torchvision"] == "0.29.1+cpu"
    assert {"boto3", "numpy", "safetensors", "sympy-stand-in"} <= set(installed)
    assert "nvidia-cuda-stand-in" not in installed


@pytest.mark.slow
def test_install_from_a_wheel_bundle_uses_no_index_and_resumes_in_the_same_venv(
    stack: Stack, nucleus: Nucleus, runner: StepRunner, tmp_path: Path
) -> None:
    wheels = fake_device_wheels(tmp_path / "wheels")
    bundle = build_wheel_bundle(wheels, tmp_path / "bundle" / "sfl-edge-wheels.zip")
    zip_path, sha = client_zip(tmp_path)
    recipe = recipe_for(
        stack.config,
        stack.names,
        "eu-west-1",
        sha,
        wheel_bundle=WheelBundle(
            uri="s3://artifact-bucket/edge/sfl-edge-wheels.zip", sha256=bundle.sha256
        ),
    )
    merge = {"pythonInterpreter": usable_interpreter(runner)}
    # An Install cut short: the venv is built, then pip fails (the bundle's torch is unreadable).
    lifecycle = nucleus.deploy(recipe, [zip_path, bundle.path], merge=merge)
    unpacked = Path(lifecycle["Install"]["Script"].split('wheels="', 1)[1].split('"', 1)[0])
    torch_wheel = next(unpacked.glob("torch-*.whl"))
    torch_wheel.chmod(0o000)
    first = nucleus.install(lifecycle)
    assert first.returncode != 0
    marker = nucleus.work / "venv" / "kept-from-the-first-attempt"
    marker.write_text("the retry must not start over")

    torch_wheel.chmod(0o440)
    retry = nucleus.install(lifecycle)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "offline, from the wheel bundle" in retry.stdout
    assert marker.exists()
    assert _installed(nucleus)["torch"] == "2.14.1+cpu"  # the bundle's, from no index


# --- which manifest a device gets ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("os_arch", "chosen"),
    [
        ("amd64", "linux-x86_64"),  # a 64-bit JVM on x86-64
        ("x86_64", "linux-x86_64"),
        ("aarch64", "linux-aarch64"),  # Jetson, Graviton, a Raspberry Pi with a 64-bit OS
        ("arm", None),  # a 32-bit JVM: armv7l boards, or a 32-bit OS on a 64-bit Pi
        ("i386", None),  # 32-bit x86
        ("x86", None),
        ("riscv64", None),  # "unknown" to Greengrass
    ],
)
def test_greengrass_gives_a_device_the_manifest_of_its_architecture_or_refuses(
    os_arch: str, chosen: str | None
) -> None:
    """The nucleus's own matching: amd64 and aarch64 devices each get their manifest (whose
    Install checks the interpreter is built for it); every other architecture matches none,
    so Greengrass refuses the component before downloading anything (torch publishes no
    wheels there)."""
    recipe = recipe_for(
        FederationConfig(), ResourceNames("m", "u", "c", "r"), "eu-west-1", "a" * 64
    )
    architecture = greengrass_architecture(os_arch)
    manifest = find_best_match({"os": "linux", "architecture": architecture}, recipe["Manifests"])
    if chosen is None:
        assert manifest is None
    else:
        assert manifest is not None and manifest["Platform"]["architecture"] == architecture
        assert manifest["Lifecycle"]["Install"]["Setenv"]["SFL_INSTALL_PLATFORM"] == chosen
    for other_os in ("darwin", "windows"):
        assert (
            find_best_match({"os": other_os, "architecture": "amd64"}, recipe["Manifests"]) is None
        )


# --- settings that change on a device that installed before ------------------------------------


def preinstalled_site(
    directory: Path, *, torch_version: str, torch_source: str | None = None, pip: bool = False
) -> Path:
    """A device's preinstalled packages, as a JetPack image has them: this venv's
    site-packages linked entry by entry, without pip unless asked (Install then runs
    ensurepip, as on a device whose system Python has torch and no pip), torch's metadata
    saying ``torch_version``. ``torch_source`` replaces torch's ``__init__`` (a broken build)."""
    directory.mkdir(parents=True)
    skipped = re.compile(
        r"^(torch-.*\.dist-info)$" if pip else r"^(pip|pip-.*\.dist-info|torch-.*\.dist-info)$"
    )
    for site in project_site_packages().split(":"):
        for entry in Path(site).iterdir():
            if skipped.match(entry.name) or (torch_source is not None and entry.name == "torch"):
                continue
            if not (directory / entry.name).is_symlink():
                (directory / entry.name).symlink_to(entry)
    if torch_source is not None:
        (directory / "torch").mkdir()
        (directory / "torch" / "__init__.py").write_text(torch_source)
    dist_info = directory / f"torch-{torch_version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n"
        "Requires-Dist: setuptools>=77.0.3\nRequires-Dist: sympy>=1.13.3\n"
    )
    (dist_info / "RECORD").write_text("")
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


JETSON_TORCH = "2.5.0a0+872d972e41.nv24.08"  # NVIDIA's JetPack 6 build: never equals a pin


@pytest.mark.slow
def test_changing_install_settings_on_an_installed_device_builds_the_venv_anew(
    stack: Stack, nucleus: Nucleus, runner: StepRunner, tmp_path: Path
) -> None:
    """The first Install built the venv (ensurepip's setuptools 66.1.1 from Debian's Python
    3.11 in it) and could not get torch (an index that does not serve it, as a blocked
    PyTorch index); the operator then points the device at the torch it already has, offline,
    as docs/greengrass.md says. That torch's real metadata needs setuptools>=77.0.3, which
    the old setuptools in the venv would shadow."""
    zip_path, sha = client_zip(tmp_path)
    recipe = recipe_for(stack.config, stack.names, "eu-west-1", sha)
    blocked = nucleus.root / "blocked-index"
    blocked.mkdir()
    blocked.chmod(0o755)
    first = nucleus.install(
        nucleus.deploy(
            recipe,
            [zip_path],
            merge={
                "pythonInterpreter": usable_interpreter(runner),
                "torchIndexUrl": blocked.as_uri(),
            },
        )
    )
    assert first.returncode != 0 and "torch==2.14.1" in first.stderr, first.stdout + first.stderr
    python = nucleus.work / "venv" / "bin" / "python"
    env = {"PATH": os.environ["PATH"], "PIP_CONFIG_FILE": os.devnull}
    site = Path(
        nucleus.runner.run(
            f'"{python}" -c "import sysconfig; print(sysconfig.get_path(\'purelib\'))"',
            nucleus.work,
            env,
            timeout=60,
        ).stdout.strip()
    )
    assert (site / "pip").is_dir() and not list(site.glob("setuptools-*"))  # ensurepip's: gone
    # The venv as an Install of an earlier version left it: ensurepip's setuptools in place.
    ensured = nucleus.runner.run(f'"{python}" -m ensurepip', nucleus.work, env, timeout=120)
    assert ensured.returncode == 0, ensured.stderr
    (old_setuptools,) = site.glob("setuptools-*.dist-info")
    assert int(old_setuptools.name.split("-")[1].split(".")[0]) < 77, old_setuptools.name

    changed = nucleus.deploy(
        recipe,
        [zip_path],
        merge={"extraSitePackages": project_site_packages(), "pipOptions": "--no-index"},
    )
    second = nucleus.install(changed)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert "install settings changed: building" in second.stdout
    assert "reusing the preinstalled torch 2.14.1" in second.stdout
    assert not list(site.glob("setuptools-*.dist-info"))  # the project's 84.x is the one seen


@pytest.mark.slow
def test_a_preinstalled_jetson_torch_is_reused_whatever_its_version(
    stack: Stack, nucleus: Nucleus, runner: StepRunner, tmp_path: Path
) -> None:
    """NVIDIA's torch never satisfies ``torch==2.14.1``; with a CPU torch within pip's reach,
    the old Install put that into the venv, shadowing the device's own. Install checks the
    preinstalled one works (numpy in, a training step, safetensors out) and keeps it."""
    jetson = preinstalled_site(nucleus.root / "jetson-site", torch_version=JETSON_TORCH, pip=True)
    cpu_wheels = nucleus.root / "cpu-wheels"
    _fake_wheel(cpu_wheels, "torch", "2.14.1+cpu", requires=["setuptools>=77.0.3"])
    for path in [cpu_wheels, *cpu_wheels.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    lifecycle = deploy_client(
        nucleus,
        stack,
        tmp_path,
        {
            "pythonInterpreter": usable_interpreter(runner),
            "extraSitePackages": str(jetson),
            "pipOptions": f"--no-index --find-links {cpu_wheels}",
        },
    )
    done = nucleus.install(lifecycle)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"reusing the preinstalled torch {JETSON_TORCH} from {jetson}" in done.stdout, (
        done.stdout
    )
    # pip sees the device's torch (its version normalised), none of the venv's own
    assert Version(_installed(nucleus)["torch"]) == Version(JETSON_TORCH)


@pytest.mark.slow
def test_a_preinstalled_torch_that_cannot_be_used_is_reported_plainly(
    stack: Stack, nucleus: Nucleus, runner: StepRunner, tmp_path: Path
) -> None:
    broken = preinstalled_site(
        nucleus.root / "broken-site",
        torch_version=JETSON_TORCH,
        torch_source='raise OSError("libcudnn.so.9: cannot open shared object file")\n',
        pip=True,
    )
    lifecycle = deploy_client(
        nucleus,
        stack,
        tmp_path,
        {
            "pythonInterpreter": usable_interpreter(runner),
            "extraSitePackages": str(broken),
            "pipOptions": "--no-index",
        },
    )
    failed = nucleus.install(lifecycle)
    assert failed.returncode != 0
    assert (
        f"the preinstalled torch in {broken} cannot be used: "
        "OSError libcudnn.so.9: cannot open shared object file." in failed.stderr
    ), failed.stdout + failed.stderr


# --- the device-faithful run ------------------------------------------------------------------


@pytest.fixture
def device_data(tmp_path: Path) -> Path:
    task = load_task("digits")
    splits = tmp_path / "splits"
    write_client_splits(task, splits, 2, "iid", seed=3, client_ids=[THING, OTHER_CLIENT])
    return splits


def _wait_for(log_path: Path, text: str, proc: subprocess.Popen[str], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in log_path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"component exited ({proc.returncode}):\n{log_path.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"never logged {text!r}:\n{log_path.read_text()}")


@pytest.mark.slow
def test_component_as_the_nucleus_runs_it_survives_tes_outages_upgrades_and_stops_in_grace(
    stack: Stack, nucleus: Nucleus, runner: StepRunner, tmp_path: Path, device_data: Path
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    quick = dataclasses.replace(stack.config, poll_seconds=0.2, heartbeat_seconds=1)
    zip_path, sha = client_zip(tmp_path)
    # The device's own data, at the default dataDir ("data" under the work path), its user's.
    shutil.copytree(device_data / THING, nucleus.work / "data")
    for path in [nucleus.work / "data", *(nucleus.work / "data").rglob("*")]:
        runner.own(path)
    device_merge = {
        "endpointUrl": stack.aws.endpoint_url,
        "pythonInterpreter": usable_interpreter(runner),
        "extraSitePackages": project_site_packages(),
        "pipOptions": "--no-index",
    }
    # Version A: what an earlier `cdk deploy` registered: a table since replaced.
    retired = ResourceNames(
        models_bucket=stack.names.models_bucket,
        updates_bucket=stack.names.updates_bucket,
        clients_table="sfl-clients-replaced",
        rounds_table="",
    )
    lifecycle_a = nucleus.deploy(
        recipe_for(quick, retired, stack.aws.region, sha), [zip_path], merge=device_merge
    )

    # --- Install as the component's user: builds the venv; a second run is a no-op ---
    t0 = time.monotonic()
    first = nucleus.install(lifecycle_a)
    timings["install"] = time.monotonic() - t0
    assert first.returncode == 0, first.stdout + first.stderr
    assert "reusing the preinstalled torch 2.14.1" in first.stdout
    assert (nucleus.work / "venv" / "bin" / "python").lstat().st_uid == runner.uid
    again = nucleus.install(lifecycle_a, timeout=120)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr

    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
    task = load_task("digits")
    bootstrap_model(stack.clients, stack.names, task.build_model(seed=0).state_dict(), seed=0)
    log_path = tmp_path / f"{COMPONENT}.log"  # /greengrass/v2/logs/<component>.log on a device
    with CredentialEndpoint(token=SVCUID, lifetime_seconds=60) as credentials:
        tes = FlakyTokenExchange(credentials)
        try:
            # --- Run A while the token exchange service is down: the client waits it out ---
            tes.down()
            with log_path.open("w") as log:
                proc = nucleus.start(
                    lifecycle_a, {"AWS_CONTAINER_CREDENTIALS_FULL_URI": tes.url}, log
                )
                try:
                    _wait_for(log_path, "AWS credentials unavailable", proc)
                    tes.up()
                    # A's names are the retired ones: its heartbeats fail, named, and it goes on.
                    _wait_for(log_path, "dynamodb UpdateItem ResourceNotFoundException", proc)
                finally:
                    killed = nucleus.stop(proc)
            output = log_path.read_text()
            assert not killed and proc.returncode == 0, output
            assert "client stopped" in output and "Traceback" not in output
            assert THING not in {
                r.client_id for r in registry.active(now=time.time(), active_window_seconds=600)
            }

            # --- version B from a redeploy; the running configuration merged the nucleus's way ---
            lifecycle_b = nucleus.deploy(
                recipe_for(quick, stack.names, stack.aws.region, sha), [zip_path]
            )
            t0 = time.monotonic()
            install_b = nucleus.install(lifecycle_b, timeout=300)
            timings["upgrade_install"] = time.monotonic() - t0
            assert install_b.returncode == 0, install_b.stdout + install_b.stderr
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
            log_path.write_text("")
            with log_path.open("a") as log:
                proc = nucleus.start(
                    lifecycle_b, {"AWS_CONTAINER_CREDENTIALS_FULL_URI": tes.url}, log
                )
                try:
                    other_thread.start()
                    deadline = time.time() + 90
                    while time.time() < deadline and proc.poll() is None:
                        active = {
                            r.client_id
                            for r in registry.active(
                                now=time.time(),
                                active_window_seconds=stack.config.active_window_seconds,
                            )
                        }
                        if active == {THING, OTHER_CLIENT}:
                            break
                        time.sleep(0.2)
                    assert proc.poll() is None, log_path.read_text()
                    # --- the TES goes down while the client runs; it backs off and carries on ---
                    tes.down()
                    _wait_for(log_path, "CredentialRetrievalError", proc)
                    tes.up()
                    result = start_round(stack.clients, stack.names, stack.config)
                    assert result.started and set(result.selected) == {THING, OTHER_CLIENT}, result
                    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
                    round_1 = store.get(stack.config.experiment, 1)
                    while time.time() < deadline and not (round_1 and round_1.status.finished):
                        time.sleep(0.2)
                        round_1 = store.get(stack.config.experiment, 1)
                    timings["round_closed"] = time.monotonic() - started
                    assert round_1 is not None and round_1.status is RoundState.CLOSED, (
                        round_1,
                        log_path.read_text(),
                    )
                    assert set(round_1.accepted) == {THING, OTHER_CLIENT}
                finally:
                    stop_other.set()
                    killed = nucleus.stop(proc)  # how the nucleus stops a component
                    other_thread.join(timeout=30)
                    dispatcher.stop()
        finally:
            tes.close()
        served, refused = credentials.served, credentials.refused
    output = log_path.read_text()
    assert not killed and proc.returncode == 0, output
    assert "client stopped" in output and "Traceback" not in output
    assert served >= 2 and refused == 0, (served, refused)  # the token reached it through sudo
    timings["total"] = time.monotonic() - started
    print(f"nucleus test timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


@pytest.mark.slow
def test_an_apps_own_task_installs_and_trains_as_the_nucleus_runs_it(
    stack: Stack,
    nucleus: Nucleus,
    runner: StepRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An app made by ``sfl new`` outside this repository, its task named by import path:
    Install puts its pins in the component's venv, Run (as the component's user, PYTHONPATH
    the unpacked artifact) trains that task, and the round closes on its update."""
    import importlib.metadata

    from sfl.build.app_code import APP_REQUIREMENTS, DEVICE, plan
    from sfl.build.new_app import create_app

    app = create_app(tmp_path / "leaf-scanner")
    pillow = f"pillow=={importlib.metadata.version('pillow')}"
    (app.root / APP_REQUIREMENTS).write_text(pillow + "\n")
    monkeypatch.syspath_prepend(str(app.root))  # this process plays the server and the data
    config = dataclasses.replace(stack.config, task=app.task, poll_seconds=0.2, heartbeat_seconds=1)
    shipment = plan(config, app_root=app.root).for_place(DEVICE)
    info = build_client_artifact(tmp_path / "sfl-edge-client.zip", app=shipment)
    task = load_task(app.task)
    write_client_splits(task, tmp_path / "splits", 1, "iid", seed=3, client_ids=[THING])
    shutil.copytree(tmp_path / "splits" / THING, nucleus.work / "data")
    for path in [nucleus.work / "data", *(nucleus.work / "data").rglob("*")]:
        runner.own(path)
    lifecycle = nucleus.deploy(
        recipe_for(config, stack.names, stack.aws.region, info.sha256),
        [info.path],
        merge={
            "endpointUrl": stack.aws.endpoint_url,
            "pythonInterpreter": usable_interpreter(runner),
            "extraSitePackages": project_site_packages(),
            "pipOptions": "--no-index",
        },
    )
    installed = nucleus.install(lifecycle)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert f"Requirement already satisfied: {pillow}" in installed.stdout

    reference = task.build_model(seed=0).state_dict()
    bootstrap_model(stack.clients, stack.names, reference, seed=0)
    log_path = tmp_path / f"{COMPONENT}.log"
    dispatcher = S3EventDispatcher(
        stack.aws.client("sqs"), stack.deployment.queue_url, LocalFunction("averager").invoke
    ).start()
    registry = ClientRegistry(stack.clients.dynamodb, stack.names.clients_table)
    store = RoundStore(stack.clients.dynamodb, stack.names.rounds_table)
    with CredentialEndpoint(token=SVCUID, lifetime_seconds=60) as credentials:
        try:
            with log_path.open("w") as log:
                proc = nucleus.start(
                    lifecycle, {"AWS_CONTAINER_CREDENTIALS_FULL_URI": credentials.url}, log
                )
                try:
                    deadline = time.time() + 120
                    while time.time() < deadline and THING not in {
                        r.client_id
                        for r in registry.active(now=time.time(), active_window_seconds=600)
                    }:
                        assert proc.poll() is None, log_path.read_text()
                        time.sleep(0.2)
                    result = start_round(stack.clients, stack.names, config)
                    assert result.started and result.selected == (THING,), result
                    closed = store.get(config.experiment, 1)
                    while time.time() < deadline and not (closed and closed.status.finished):
                        time.sleep(0.2)
                        closed = store.get(config.experiment, 1)
                finally:
                    killed = nucleus.stop(proc)
        finally:
            dispatcher.stop()
    output = log_path.read_text()
    assert closed is not None and closed.status is RoundState.CLOSED, (closed, output)
    assert set(closed.accepted) == {THING}
    assert not killed and "Traceback" not in output, output
    # Version 1 is the app's model (its layers, its shapes), trained: it moved from version 0.
    import torch

    from sfl.core import layout
    from sfl.learning import codec

    body = stack.clients.s3.get_object(Bucket=stack.names.models_bucket, Key=layout.model_key(1))[
        "Body"
    ].read()
    version_1 = codec.decode(body)
    assert {k: tuple(v.shape) for k, v in version_1.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    assert not all(torch.equal(version_1[k], reference[k]) for k in reference)
