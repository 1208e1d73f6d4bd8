"""Greengrass V2 recipes for the edge client, generated from the configuration the stack uses.

The stack registers the recipe inline (with the client artifact as an S3 asset); ``sfl recipes``
writes it as JSON and YAML for the console or the GDK. Two kinds of settings, kept apart on
purpose because of how the nucleus merges configuration (``KernelConfigResolver``: a running
component's configuration is kept, and a new version's ``DefaultConfiguration`` only fills keys
that are missing):

- **stack-owned** (``STACK_SETTINGS``: bucket and table names, region, task, poll/heartbeat/
  active-window tuning) are literal values in the ``Run`` step's ``Setenv``. Each component
  version carries its own, so a redeploy reaches devices that already run the component.
- **device-owned** (``CONFIGURATION_KEYS``: data directory, endpoint override, interpreter,
  site-packages, pip options, torch index) are ``DefaultConfiguration`` values a deployment's
  configuration merge may change per device; they reach the steps through ``Setenv``
  placeholders, so no value is ever parsed as shell code.

One manifest per architecture torch has Linux wheels for (``ARCHITECTURES``, under
Greengrass's names), so Greengrass itself refuses the component elsewhere. ``Install`` builds
the venv anew whenever an install setting changes, and reuses a torch the venv sees outside
itself (NVIDIA's builds on a Jetson) once a small training step proves it usable.

The nucleus runs steps as ``sudo -n -E -H -u <user> -g <group> -- sh -c <script>``, and sudo's
default policy removes ``PYTHONPATH``, ``PYTHONHOME``, ``LD_*`` and more from the environment
even with ``-E`` (``sudo -V`` lists them): nothing a step needs travels in such a variable;
the ``Run`` script sets ``PYTHONPATH`` itself. No credentials: the Token Exchange Service
gives the client its credentials. Imports no torch and no CDK.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sfl
from sfl.build.artifact import REQUIREMENTS_FILE
from sfl.core.config import FederationConfig
from sfl.core.device_settings import CONFIGURATION_KEYS
from sfl.core.notices import NOTICE_TOPIC_ENV
from sfl.core.resources import ResourceNames

RECIPE_FORMAT_VERSION = "2020-01-25"
TES_COMPONENT = "aws.greengrass.TokenExchangeService"
TES_VERSION_REQUIREMENT = ">=2.0.0 <3.0.0"
# Greengrass IPC's MQTT proxy (the nucleus's connection to IoT Core) and the one operation the
# client asks of it (nucleus MqttProxyIPCService, GreengrassCoreIPCService).
MQTT_PROXY_SERVICE = "aws.greengrass.ipc.mqttproxy"
SUBSCRIBE_TO_IOT_CORE = "aws.greengrass#SubscribeToIoTCore"
DEFAULT_COMPONENT_NAME = "Sfl.EdgeClient"
COMPONENT_PUBLISHER = "serverless-federated-learning"
# Installing torch on a small device takes a while; Greengrass's default is 120 s. A retry
# after a time-out continues where it stopped (same venv, pip's cache under the work path).
INSTALL_TIMEOUT_SECONDS = 1_800
VENV_DIR = "venv"  # under the component's work path, which survives version upgrades
PIP_CACHE_DIR = "pip-cache"  # likewise: downloaded wheels survive a failed or repeated Install
INSTALL_STAMP = ".sfl-install-stamp"
VENV_STAMP = ".sfl-venv-stamp"
EXTRA_SITE_PACKAGES_PTH = "sfl-extra-site-packages.pth"
# The requirements less torch and torchvision, when a preinstalled torch is reused.
REQUIREMENTS_REUSING_TORCH = "requirements-reusing-torch.txt"
MIN_PYTHON = (3, 10)  # Ubuntu 22.04 and NVIDIA JetPack 6 ship 3.10
# PyTorch's own index of CPU-only wheels (x86-64 and aarch64): torch comes from here by
# default, so a device never downloads the CUDA wheels PyPI's torch pulls in on Linux.
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# One manifest per architecture torch publishes Linux wheels for, under Greengrass's names
# (nucleus PlatformResolver.getArchInfo: os.arch x86_64/amd64 -> amd64, aarch64 -> aarch64;
# i386/x86 -> x86 and any arm* -> arm match none, so Greengrass refuses the component there),
# with the interpreter platform (sysconfig.get_platform()) Install requires on each.
ARCHITECTURES = {"amd64": "linux-x86_64", "aarch64": "linux-aarch64"}

# Greengrass's own placeholder syntax: {namespace:key}, e.g. {configuration:/dataDir}.
PLACEHOLDER = re.compile(r"\{([.\w]+):([^:}]+)\}")
PLACEHOLDERS = {
    "artifacts": ("path", "decompressedPath"),
    "work": ("path",),
    "kernel": ("rootPath",),
    "iot": ("thingName",),
}
# Environment variables sudo's default policy removes even with -E (sudo -V, "Environment
# variables to remove"), as patterns; a recipe must not rely on any of them.
SUDO_REMOVED_VARIABLES = (
    "RUBYOPT", "RUBYLIB", "PYTHONUSERBASE", "PYTHONINSPECT", "PYTHONPATH", "PYTHONHOME",
    "TMPPREFIX", "ZDOTDIR", "READNULLCMD", "NULLCMD", "FPATH", "PERL5DB", "PERL5OPT",
    "PERL5LIB", "PERLLIB", "PERLIO_DEBUG", "JAVA_TOOL_OPTIONS", "SHELLOPTS", "BASHOPTS",
    "GLOBIGNORE", "PS4", "BASH_ENV", "ENV", "TERMCAP", "TERMPATH", "TERMINFO_DIRS", "TERMINFO",
    "_RLD*", "LD_*", "PATH_LOCALE", "NLSPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN",
    "CDPATH", "IFS",
)  # fmt: skip
# Reverse-DNS: two or more dot-separated labels. AWS reserves the aws.greengrass prefix.
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+$")
_RESERVED_PREFIX = "aws.greengrass"
_ARCHIVE_NAME = re.compile(r"^[A-Za-z0-9._-]+\.zip$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RecipeError(ValueError):
    """A recipe cannot be built from these inputs (bad component name, artifact, ...)."""


class ClientResourceNames(Protocol):
    """The deployed names a device needs (``sfl.core.resources.ResourceNames`` has them)."""

    @property
    def models_bucket(self) -> str: ...

    @property
    def updates_bucket(self) -> str: ...

    @property
    def clients_table(self) -> str: ...


@dataclass(frozen=True)
class DeviceDefaults:
    """Defaults with no source in the stack; each device's deployment may override them.

    ``data_dir`` is relative to the component's work directory
    (``/greengrass/v2/work/<ComponentName>``) unless absolute. ``python_interpreter``,
    ``system_site_packages`` and ``extra_site_packages`` let a device reuse packages it
    already has (NVIDIA's torch on a Jetson): ``extra_site_packages`` is a ':'-separated list
    of directories the virtual environment sees after its own (written to a ``.pth`` file).
    ``pip_options`` go to every ``pip install`` (``--index-url``, proxy, ...);
    ``torch_index_url`` is where torch alone comes from ('' : wherever the rest comes from).
    """

    data_dir: str = "data"
    endpoint_url: str = ""
    python_interpreter: str = "python3"
    system_site_packages: bool = False
    extra_site_packages: str = ""
    pip_options: str = ""
    torch_index_url: str = PYTORCH_CPU_INDEX


@dataclass(frozen=True)
class StackSetting:
    """A stack-owned setting: a literal in the ``Run`` step's ``Setenv`` of each version."""

    variable: str
    doc: str


_RUN_ENV = ResourceNames.ENV
STACK_SETTINGS = (
    StackSetting(_RUN_ENV["models_bucket"], "global models and the assignment"),
    StackSetting(_RUN_ENV["updates_bucket"], "where updates go"),
    StackSetting(_RUN_ENV["clients_table"], "the client registry"),
    StackSetting("AWS_REGION", "the stack's AWS region"),
    StackSetting("SFL_TASK", "training task name or import path"),
    StackSetting("SFL_TASK_PARAMS", "the task's parameters, a JSON object"),
    StackSetting("SFL_POLL_SECONDS", "idle poll interval"),
    StackSetting("SFL_HEARTBEAT_SECONDS", "heartbeat interval"),
    StackSetting(NOTICE_TOPIC_ENV, "the round notices' MQTT topic ('' : none, poll only)"),
    StackSetting("SFL_PUSH_POLL_SECONDS", "idle poll interval while notices arrive"),
    StackSetting("SFL_PUSH_HEARTBEAT_SECONDS", "heartbeat interval while notices arrive"),
    StackSetting("SFL_ACTIVE_WINDOW_SECONDS", "the federation's active window (registry expiry)"),
)


@dataclass(frozen=True)
class WheelBundle:
    """A second artifact: a zip of wheels the Install step installs from, with no index."""

    uri: str
    sha256: str
    archive_name: str | None = None  # when the URI's file name is not literal (a CDK token)


# POSIX sh: Greengrass runs each script with `sh -c` in the component's work directory, as
# the component's user. Configuration values arrive as environment variables (Setenv), so no
# value is ever parsed as shell code; only pipOptions is split into words, on purpose.
_INSTALL_SCRIPT = """\
set -eu
work="{work:path}"
venv="$work/@VENV_DIR@"
requirements="{artifacts:decompressedPath}/@ARCHIVE_ROOT@/@REQUIREMENTS_FILE@"
wheels="@WHEELS@"
stamp="$venv/@INSTALL_STAMP@"
wanted=$( (cat "$requirements"; printf '%s\\n' "python=$SFL_INSTALL_PYTHON" \\
  "system=$SFL_INSTALL_SYSTEM_SITE_PACKAGES" "extra=$SFL_INSTALL_EXTRA_SITE_PACKAGES" \\
  "pip=$SFL_INSTALL_PIP_OPTIONS" "torch=$SFL_INSTALL_TORCH_INDEX_URL" "wheels=$wheels") \\
  | sha256sum | cut -d ' ' -f 1)
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null || true)" = "$wanted" ]; then
  echo "sfl install: $venv is up to date"
  exit 0
fi
case "$SFL_INSTALL_SYSTEM_SITE_PACKAGES" in
  true) venv_options=--system-site-packages ;;
  false) venv_options= ;;
  *) echo "sfl install: systemSitePackages must be true or false" >&2; exit 1 ;;
esac
if ! "$SFL_INSTALL_PYTHON" -c 'import sys; sys.exit(sys.version_info < (@MIN_PYTHON@))'; then
  echo "sfl install: pythonInterpreter $SFL_INSTALL_PYTHON is not Python @MIN_VERSION@+" >&2
  exit 1
fi
built_for=$("$SFL_INSTALL_PYTHON" -c 'import sysconfig; print(sysconfig.get_platform())')
if [ "$built_for" != "$SFL_INSTALL_PLATFORM" ]; then
  echo "sfl install: pythonInterpreter $SFL_INSTALL_PYTHON is built for $built_for, this" \\
    "device's manifest needs $SFL_INSTALL_PLATFORM (torch has no wheels for others)" >&2
  exit 1
fi
# The venv holds what these settings put in it: built anew when one changes, so nothing a
# previous Install put there (ensurepip's setuptools, a CPU torch) shadows packages a new
# setting exposes. The same settings after an Install cut short (a time-out, a lost network)
# resume in the same venv, with pip's cache of wheels.
made=$( ("$SFL_INSTALL_PYTHON" -c 'import sys; print(sys.executable, sys.version)'; \\
  printf '%s\\n' "$venv_options" "extra=$SFL_INSTALL_EXTRA_SITE_PACKAGES" \\
  "pip=$SFL_INSTALL_PIP_OPTIONS" "torch=$SFL_INSTALL_TORCH_INDEX_URL" \\
  "bundle=$([ -z "$wheels" ] || echo yes)") | sha256sum | cut -d ' ' -f 1)
venv_stamp="$venv/@VENV_STAMP@"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv_stamp" 2>/dev/null || true)" != "$made" ]; then
  if [ -e "$venv" ]; then
    echo "sfl install: install settings changed: building $venv anew"
  fi
  rm -rf "$venv"
  "$SFL_INSTALL_PYTHON" -m venv --without-pip $venv_options "$venv"
  echo "$made" > "$venv_stamp"
fi
rm -f "$stamp"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
if [ -n "$SFL_INSTALL_EXTRA_SITE_PACKAGES" ]; then
  printf '%s\\n' "$SFL_INSTALL_EXTRA_SITE_PACKAGES" | tr ':' '\\n' > "$site/@EXTRA_PTH@"
else
  rm -f "$site/@EXTRA_PTH@"
fi
if ! "$venv/bin/python" -m pip --version > /dev/null 2>&1; then
  "$venv/bin/python" -m ensurepip --default-pip
  # Python <= 3.11's ensurepip also leaves an old setuptools (65-66) in the venv, which would
  # shadow a newer one beside a preinstalled torch (torch 2.14 needs >= 77.0.3): pip installs
  # none, so setuptools is a dependency like any other.
  if [ -d "$site/setuptools" ]; then
    "$venv/bin/python" -m pip uninstall --yes --quiet --disable-pip-version-check setuptools
  fi
fi
pip_install() {
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-input \\
    --cache-dir "$work/@PIP_CACHE@" "$@"
}
# A torch the venv sees outside itself (systemSitePackages, extraSitePackages) is reused
# whatever its version string (NVIDIA's builds never equal the pin) once it proves usable
# below; the pinned torch and torchvision are then not installed (torchvision's pin would
# pull the pinned torch back in).
outside() {
  "$venv/bin/python" -c 'import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
origin = os.path.abspath(spec.origin) if spec and spec.origin else ""
ours = os.path.realpath(origin).startswith(os.path.realpath(sys.prefix) + os.sep)
where = os.path.dirname(origin)
if spec and spec.submodule_search_locations:
    where = os.path.dirname(where)
print(where if origin and not ours else "")' "$1"
}
preinstalled=$(outside torch)
if [ -n "$preinstalled" ]; then
  echo "sfl install: a preinstalled torch is visible in $preinstalled: not installing torch"
  if [ -z "$(outside torchvision)" ]; then
    echo "sfl install: no torchvision beside it: tasks that need torchvision" \\
      "(image_folder) will not run on this device" >&2
  fi
  grep -v -E '^(torch|torchvision)==' "$requirements" > "$venv/@REQUIREMENTS_REUSING@"
  requirements="$venv/@REQUIREMENTS_REUSING@"
fi
set -f
if [ -n "$wheels" ]; then
  echo "sfl install: offline, from the wheel bundle $wheels"
  pip_install --no-index --find-links "$wheels" $SFL_INSTALL_PIP_OPTIONS -r "$requirements"
else
  torch=$(grep -E '^(torch|torchvision)==' "$requirements" || true)
  if [ -n "$SFL_INSTALL_TORCH_INDEX_URL" ] && [ -n "$torch" ]; then
    # torch and torchvision alone from their index (CPU wheels by default: PyPI's are built
    # for CUDA on Linux); their dependencies come from below. One pin per line, unquoted.
    pip_install --no-deps $SFL_INSTALL_PIP_OPTIONS --index-url "$SFL_INSTALL_TORCH_INDEX_URL" \\
      $torch
  fi
  pip_install $SFL_INSTALL_PIP_OPTIONS -r "$requirements"
fi
set +f
if [ -n "$preinstalled" ]; then
  # What the client does with torch, in small: numpy in, a training step, safetensors out.
  if ! checked=$("$venv/bin/python" -c 'import importlib.metadata, sys
try:
    import numpy
    import torch
    from safetensors.torch import load, save
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.from_numpy(numpy.ones((3, 4), dtype=numpy.float32))
    loss = torch.nn.functional.cross_entropy(model(inputs), torch.tensor([0, 1, 0]))
    loss.backward()
    optimizer.step()
    state = load(save(model.state_dict()))
    assert torch.equal(state["weight"], model.weight.detach()), "safetensors round trip differs"
except Exception as error:
    print(type(error).__name__, *str(error).splitlines()[:1])
    sys.exit(1)
try:
    print(importlib.metadata.version("torch"))
except importlib.metadata.PackageNotFoundError:
    print(torch.__version__)'); then
    echo "sfl install: the preinstalled torch in $preinstalled cannot be used: $checked." \\
      "Repair it, or stop exposing it (systemSitePackages, extraSitePackages) to install" \\
      "the pinned torch into $venv" >&2
    exit 1
  fi
  echo "sfl install: reusing the preinstalled torch $checked from $preinstalled"
fi
echo "$wanted" > "$stamp"
echo "sfl install: installed $requirements into $venv"
"""

# PYTHONPATH is set here, not in Setenv: sudo's default policy would remove it.
_RUN_SCRIPT = """\
PYTHONPATH="{artifacts:decompressedPath}/@ARCHIVE_ROOT@"
PYTHONNOUSERSITE=1
PYTHONUNBUFFERED=1
export PYTHONPATH PYTHONNOUSERSITE PYTHONUNBUFFERED
exec "{work:path}/@VENV_DIR@/bin/python" -m edge_client
"""


def validate_component_name(name: str) -> str:
    """A reverse-DNS component name (``com.example.EdgeClient``) outside ``aws.greengrass``."""
    if name.lower() == _RESERVED_PREFIX or name.lower().startswith(_RESERVED_PREFIX + "."):
        raise RecipeError(
            f"component name {name!r}: names starting with 'aws.greengrass' are reserved for "
            "AWS-provided components; use your own reverse-DNS prefix, "
            "e.g. 'com.example.EdgeClient'"
        )
    if len(name) > 128 or not _COMPONENT_NAME.match(name):
        raise RecipeError(
            f"component name {name!r}: use a reverse-DNS name of 1-128 characters, two or more "
            "'.'-separated labels of letters, digits, '_' or '-' (e.g. 'com.example.EdgeClient')"
        )
    return name


def archive_root(archive_name: str) -> str:
    """The folder Greengrass unpacks a ZIP artifact into under {artifacts:decompressedPath}."""
    if not _ARCHIVE_NAME.match(archive_name):
        raise RecipeError(
            f"artifact file name {archive_name!r}: must be a literal '<name>.zip' of letters, "
            "digits, '.', '_' or '-' (pass archive_name when the URI's key is not literal)"
        )
    return archive_name.removesuffix(".zip")


def stack_settings(
    config: FederationConfig, names: ClientResourceNames, *, region: str, notice_topic: str = ""
) -> dict[str, str]:
    """The stack-owned settings as the ``Run`` step's environment, in ``STACK_SETTINGS`` order
    (``notice_topic``: where round notices are pushed; '' : devices only poll)."""
    values = {
        _RUN_ENV["models_bucket"]: names.models_bucket,
        _RUN_ENV["updates_bucket"]: names.updates_bucket,
        _RUN_ENV["clients_table"]: names.clients_table,
        "AWS_REGION": region,
        "SFL_TASK": config.task,
        "SFL_TASK_PARAMS": config.task_params,
        "SFL_POLL_SECONDS": str(config.poll_seconds),
        "SFL_HEARTBEAT_SECONDS": str(config.heartbeat_seconds),
        NOTICE_TOPIC_ENV: notice_topic,
        "SFL_PUSH_POLL_SECONDS": str(config.push_poll_seconds),
        "SFL_PUSH_HEARTBEAT_SECONDS": str(config.push_heartbeat_seconds),
        "SFL_ACTIVE_WINDOW_SECONDS": str(config.active_window_seconds),
    }
    return {s.variable: values[s.variable] for s in STACK_SETTINGS}


def default_configuration(
    config: FederationConfig,
    names: ClientResourceNames,
    *,
    region: str,
    device: DeviceDefaults = DeviceDefaults(),
) -> dict[str, str]:
    """Every device-owned key's default, as strings, in ``CONFIGURATION_KEYS`` order.

    ``config``, ``names`` and ``region`` no longer show here (they are stack-owned, see
    ``stack_settings``); the parameters stay so that callers keep working.
    """
    del config, names, region
    values = {
        "endpointUrl": device.endpoint_url,
        "dataDir": device.data_dir,
        "pythonInterpreter": device.python_interpreter,
        "systemSitePackages": "true" if device.system_site_packages else "false",
        "extraSitePackages": device.extra_site_packages,
        "pipOptions": device.pip_options,
        "localDpClip": "0",
        "localDpNoiseMultiplier": "0",
        "torchIndexUrl": device.torch_index_url,
    }
    return {k.key: values[k.key] for k in CONFIGURATION_KEYS}


def notice_access_control(notice_topic: str) -> dict[str, Any]:
    """The component's IPC access control: subscribe to IoT Core on exactly the notice topic
    (no publish, no other topic). The stack's deployment resets ``/accessControl`` to this on
    every revision (infra.edge), so a device never keeps a topic an earlier version allowed;
    the policy's id names the topic too (without '/': the nucleus reads configuration paths
    split at '/'), for deployments made without that reset."""
    return {
        MQTT_PROXY_SERVICE: {
            f"RoundNotices.{notice_topic.replace('/', '.')}": {
                "policyDescription": "Hear round notices (a wake-up to poll the assignment)",
                "operations": [SUBSCRIBE_TO_IOT_CORE],
                "resources": [notice_topic],
            }
        }
    }


def _setenv(step: str) -> dict[str, str]:
    return {k.variable: f"{{configuration:/{k.key}}}" for k in CONFIGURATION_KEYS if k.step == step}


def _script(template: str, root: str, wheels: str = "") -> str:
    for marker, value in (
        ("@VENV_DIR@", VENV_DIR),
        ("@ARCHIVE_ROOT@", root),
        ("@REQUIREMENTS_FILE@", REQUIREMENTS_FILE),
        ("@INSTALL_STAMP@", INSTALL_STAMP),
        ("@VENV_STAMP@", VENV_STAMP),
        ("@EXTRA_PTH@", EXTRA_SITE_PACKAGES_PTH),
        ("@REQUIREMENTS_REUSING@", REQUIREMENTS_REUSING_TORCH),
        ("@PIP_CACHE@", PIP_CACHE_DIR),
        ("@WHEELS@", wheels),
        ("@MIN_PYTHON@", ", ".join(str(n) for n in MIN_PYTHON)),
        ("@MIN_VERSION@", ".".join(str(n) for n in MIN_PYTHON)),
    ):
        template = template.replace(marker, value)
    assert not re.search(r"@[A-Z_]+@", template), template
    return template


def _artifact(uri: str, sha256: str, archive_name: str | None, what: str) -> tuple[str, str]:
    """Checks an artifact's URI and digest; returns (root folder, recipe URI)."""
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise RecipeError(f"{what} URI {uri!r}: must be 's3://<bucket>/<key>.zip'")
    if not _SHA256.match(sha256):
        raise RecipeError(f"{what} SHA-256 {sha256!r}: must be 64 lowercase hex digits")
    return archive_root(archive_name or uri.rsplit("/", 1)[-1]), uri


def build_recipe(
    config: FederationConfig,
    names: ClientResourceNames,
    *,
    region: str,
    component_name: str,
    artifact_uri: str,
    artifact_sha256: str,
    archive_name: str | None = None,
    device: DeviceDefaults = DeviceDefaults(),
    component_version: str | None = None,
    wheel_bundle: WheelBundle | None = None,
    notice_topic: str = "",
) -> dict[str, Any]:
    """The edge client's recipe.

    ``notice_topic``: the topic round notices are pushed to; the recipe then lets the
    component subscribe to it (and to nothing else) through Greengrass IPC, and tells the
    client to. '' : no push, the client polls.

    ``artifact_uri`` is the client zip's ``s3://bucket/key``; ``archive_name`` is the key's
    file name, needed when it is not literal in the URI (a CDK token). ``wheel_bundle`` adds
    a zip of wheels as a second artifact and makes Install use only it (no index, offline).
    The version is ``recipe_version(recipe, artifact_sha256)`` unless given (the CDK app
    passes one computed from the resolved recipe, so token names do not make it drift); a
    wheel bundle's digest is part of it.
    """
    validate_component_name(component_name)
    root, _ = _artifact(artifact_uri, artifact_sha256, archive_name, "artifact")
    if not region or any(c.isspace() for c in region):
        raise RecipeError(f"region {region!r}: must be a region name such as 'eu-west-1'")
    artifacts: list[dict[str, Any]] = [
        {
            "Uri": artifact_uri,
            "Unarchive": "ZIP",
            "Permission": {"Read": "OWNER", "Execute": "NONE"},
        }
    ]
    wheels = ""
    if wheel_bundle is not None:
        bundle_root, bundle_uri = _artifact(
            wheel_bundle.uri, wheel_bundle.sha256, wheel_bundle.archive_name, "wheel bundle"
        )
        if bundle_root == root:
            raise RecipeError(f"the wheel bundle and the client zip are both {root!r}.zip")
        wheels = f"{{artifacts:decompressedPath}}/{bundle_root}"
        artifacts.append(
            {
                "Uri": bundle_uri,
                "Unarchive": "ZIP",
                "Permission": {"Read": "OWNER", "Execute": "NONE"},
            }
        )
    recipe: dict[str, Any] = {
        "RecipeFormatVersion": RECIPE_FORMAT_VERSION,
        "ComponentName": component_name,
        "ComponentVersion": "",
        "ComponentDescription": (
            "Serverless federated learning edge client: trains on this device's data when a "
            "round picks it and uploads its update; AWS access through the Greengrass token "
            "exchange service."
        ),
        "ComponentPublisher": COMPONENT_PUBLISHER,
        "ComponentDependencies": {
            TES_COMPONENT: {
                "VersionRequirement": TES_VERSION_REQUIREMENT,
                "DependencyType": "HARD",
            }
        },
        "ComponentConfiguration": {
            "DefaultConfiguration": {
                **default_configuration(config, names, region=region, device=device),
                **({"accessControl": notice_access_control(notice_topic)} if notice_topic else {}),
            }
        },
        "Manifests": [
            {
                "Platform": {"os": "linux", "architecture": architecture},
                "Lifecycle": {
                    "Install": {
                        "Script": _script(_INSTALL_SCRIPT, root, wheels),
                        "Timeout": INSTALL_TIMEOUT_SECONDS,
                        "RequiresPrivilege": False,
                        "Setenv": {
                            "SFL_INSTALL_PLATFORM": interpreter_platform,
                            **_setenv("Install"),
                        },
                    },
                    "Run": {
                        "Script": _script(_RUN_SCRIPT, root),
                        "RequiresPrivilege": False,
                        "Setenv": {
                            **stack_settings(
                                config, names, region=region, notice_topic=notice_topic
                            ),
                            **_setenv("Run"),
                        },
                    },
                },
                "Artifacts": [dict(a) for a in artifacts],
            }
            for architecture, interpreter_platform in ARCHITECTURES.items()
        ],
    }
    digest = artifact_sha256 + (wheel_bundle.sha256 if wheel_bundle else "")
    recipe["ComponentVersion"] = component_version or recipe_version(recipe, digest)
    return recipe


def run_environment(
    recipe: Mapping[str, Any], configuration: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """What the ``Run`` step's ``Setenv`` gives the client, non-empty values only.

    ``configuration`` is the device's running configuration (default: the recipe's
    ``DefaultConfiguration``); ``{configuration:/key}`` placeholders are resolved from it.
    System placeholders (``{work:path}``, ...) are left as they are.
    """
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    values = {**defaults, **(configuration or {})}
    manifest = recipe["Manifests"][0]  # every manifest runs the same Run step

    def resolve(match: re.Match[str]) -> str:
        if match[1] != "configuration":
            return match[0]
        return str(values[match[2].lstrip("/")])

    env = {
        name: PLACEHOLDER.sub(resolve, str(value))
        for name, value in manifest["Lifecycle"]["Run"].get("Setenv", {}).items()
    }
    return {name: value for name, value in env.items() if value}


def recipe_version(recipe: Mapping[str, Any], artifact_sha256: str) -> str:
    """``<major>.<minor>.<n>``: the package's version with a digest of recipe + artifact as patch.

    Changes when the client code (artifact hash) or anything in the recipe changes; the patch
    stays below 2**28, inside what Greengrass's semantic-version parser accepts.
    """
    content = {k: v for k, v in recipe.items() if k != "ComponentVersion"}
    digest = hashlib.sha256(
        json.dumps(content, sort_keys=True, default=str).encode() + b"\n" + artifact_sha256.encode()
    ).hexdigest()
    major, minor, *_ = sfl.__version__.split(".")
    return f"{major}.{minor}.{int(digest[:7], 16)}"


def placeholders(value: Any) -> list[tuple[str, str]]:
    """Every ``{namespace:key}`` placeholder in a recipe (or part of one), in order."""
    if isinstance(value, str):
        return [(m[1], m[2]) for m in PLACEHOLDER.finditer(value)]
    if isinstance(value, Mapping):
        return [p for v in value.values() for p in placeholders(v)]
    if isinstance(value, list):
        return [p for v in value for p in placeholders(v)]
    return []


def write_recipes(out_dir: Path, recipe: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``<ComponentName>.json`` and ``<ComponentName>.yaml``; returns both paths."""
    import yaml

    dumper: Any = type("RecipeDumper", (yaml.SafeDumper,), {})

    def _str(representer: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None  # scripts as literal blocks, readable as sh
        return representer.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    dumper.add_representer(str, _str)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = str(recipe["ComponentName"])
    json_path = out_dir / f"{stem}.json"
    yaml_path = out_dir / f"{stem}.yaml"
    json_path.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    yaml_path.write_text(
        "---\n" + yaml.dump(dict(recipe), Dumper=dumper, sort_keys=False, width=100),
        encoding="utf-8",
    )
    return json_path, yaml_path
