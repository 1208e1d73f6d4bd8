"""Greengrass V2 recipes for the edge client, generated from the configuration the stack uses.

The stack registers the recipe inline (with the client artifact as an S3 asset); ``sfl recipes``
writes it as JSON and YAML for the console or the GDK. Every ``DefaultConfiguration`` value is a
string and reaches the device through a lifecycle step's ``Setenv``: the ``Run`` keys become
the environment variables ``python -m edge_client`` reads, the ``Install`` keys steer how the
virtual environment is built. A deployment's configuration merge changes any of them without
new code. No credentials: the Token Exchange Service gives the client its credentials.
Imports no torch and no CDK.
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
from sfl.artifact import REQUIREMENTS_FILE
from sfl.config import FederationConfig
from sfl.resources import ResourceNames

RECIPE_FORMAT_VERSION = "2020-01-25"
TES_COMPONENT = "aws.greengrass.TokenExchangeService"
TES_VERSION_REQUIREMENT = ">=2.0.0 <3.0.0"
DEFAULT_COMPONENT_NAME = "Sfl.EdgeClient"
COMPONENT_PUBLISHER = "serverless-federated-learning"
# Installing torch on a small device takes a while; Greengrass's default is 120 s.
INSTALL_TIMEOUT_SECONDS = 1_800
VENV_DIR = "venv"  # under the component's work path, which survives version upgrades
INSTALL_STAMP = ".sfl-install-stamp"
EXTRA_SITE_PACKAGES_PTH = "sfl-extra-site-packages.pth"

# Greengrass's own placeholder syntax: {namespace:key}, e.g. {configuration:/pollSeconds}.
PLACEHOLDER = re.compile(r"\{([.\w]+):([^:}]+)\}")
PLACEHOLDERS = {
    "artifacts": ("path", "decompressedPath"),
    "work": ("path",),
    "kernel": ("rootPath",),
    "iot": ("thingName",),
}
# Reverse-DNS: two or more dot-separated labels. AWS reserves the aws.greengrass prefix.
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+$")
_RESERVED_PREFIX = "aws.greengrass"
_ARCHIVE_NAME = re.compile(r"^[A-Za-z0-9._-]+\.zip$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RecipeError(ValueError):
    """A recipe cannot be built from these inputs (bad component name, artifact, ...)."""


class ClientResourceNames(Protocol):
    """The deployed names a device needs (``sfl.resources.ResourceNames`` has them)."""

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
    ``pip_options`` go to ``pip install`` (``--index-url``, ``--no-index``, ...).
    """

    data_dir: str = "data"
    endpoint_url: str = ""
    python_interpreter: str = "python3"
    system_site_packages: bool = False
    extra_site_packages: str = ""
    pip_options: str = ""


@dataclass(frozen=True)
class ConfigurationKey:
    """A ``DefaultConfiguration`` key and the environment variable a lifecycle step sets."""

    key: str
    variable: str
    step: str  # "Install" or "Run"
    doc: str


_RUN_ENV = ResourceNames.ENV
CONFIGURATION_KEYS = (
    ConfigurationKey(
        "modelsBucket", _RUN_ENV["models_bucket"], "Run", "global models and the assignment"
    ),
    ConfigurationKey("updatesBucket", _RUN_ENV["updates_bucket"], "Run", "where updates go"),
    ConfigurationKey("clientsTable", _RUN_ENV["clients_table"], "Run", "the client registry"),
    ConfigurationKey("region", "AWS_REGION", "Run", "the stack's AWS region"),
    ConfigurationKey(
        "endpointUrl", "AWS_ENDPOINT_URL", "Run", "another AWS endpoint; '' means AWS's own"
    ),
    ConfigurationKey("dataDir", "SFL_DATA_DIR", "Run", "this device's data directory"),
    ConfigurationKey("task", "SFL_TASK", "Run", "training task name or import path"),
    ConfigurationKey("pollSeconds", "SFL_POLL_SECONDS", "Run", "idle poll interval"),
    ConfigurationKey("heartbeatSeconds", "SFL_HEARTBEAT_SECONDS", "Run", "heartbeat interval"),
    ConfigurationKey(
        "activeWindowSeconds",
        "SFL_ACTIVE_WINDOW_SECONDS",
        "Run",
        "the federation's active window (registry expiry)",
    ),
    ConfigurationKey("ewmaB", "SFL_EWMA_B", "Run", "weight of the past in the turnaround EWMA"),
    ConfigurationKey(
        "pythonInterpreter", "SFL_INSTALL_PYTHON", "Install", "Python >= 3.11 for the venv"
    ),
    ConfigurationKey(
        "systemSitePackages",
        "SFL_INSTALL_SYSTEM_SITE_PACKAGES",
        "Install",
        "'true': the venv sees the interpreter's site-packages",
    ),
    ConfigurationKey(
        "extraSitePackages",
        "SFL_INSTALL_EXTRA_SITE_PACKAGES",
        "Install",
        "':'-separated directories of preinstalled packages the venv sees",
    ),
    ConfigurationKey("pipOptions", "SFL_INSTALL_PIP_OPTIONS", "Install", "extra pip options"),
)

# POSIX sh: Greengrass runs each script with `sh -c` in the component's work directory, as
# the component's user. Configuration values arrive as environment variables (Setenv), so no
# value is ever parsed as shell code; only pipOptions is split into words, on purpose.
_INSTALL_SCRIPT = """\
set -eu
venv="{work:path}/@VENV_DIR@"
requirements="{artifacts:decompressedPath}/@ARCHIVE_ROOT@/@REQUIREMENTS_FILE@"
stamp="$venv/@INSTALL_STAMP@"
wanted=$( (cat "$requirements"; printf '%s\\n' "python=$SFL_INSTALL_PYTHON" \\
  "system=$SFL_INSTALL_SYSTEM_SITE_PACKAGES" "extra=$SFL_INSTALL_EXTRA_SITE_PACKAGES" \\
  "pip=$SFL_INSTALL_PIP_OPTIONS") | sha256sum | cut -d ' ' -f 1)
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null || true)" = "$wanted" ]; then
  echo "sfl install: $venv is up to date"
  exit 0
fi
case "$SFL_INSTALL_SYSTEM_SITE_PACKAGES" in
  true) venv_options=--system-site-packages ;;
  false) venv_options= ;;
  *) echo "sfl install: systemSitePackages must be true or false" >&2; exit 1 ;;
esac
if ! "$SFL_INSTALL_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "sfl install: pythonInterpreter '$SFL_INSTALL_PYTHON' is not Python 3.11 or newer" >&2
  exit 1
fi
rm -rf "$venv"
"$SFL_INSTALL_PYTHON" -m venv --without-pip $venv_options "$venv"
if [ -n "$SFL_INSTALL_EXTRA_SITE_PACKAGES" ]; then
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  printf '%s\\n' "$SFL_INSTALL_EXTRA_SITE_PACKAGES" | tr ':' '\\n' > "$site/@EXTRA_PTH@"
fi
if ! "$venv/bin/python" -m pip --version > /dev/null 2>&1; then
  "$venv/bin/python" -m ensurepip --default-pip
fi
set -f
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input --no-cache-dir \\
  $SFL_INSTALL_PIP_OPTIONS -r "$requirements"
echo "$wanted" > "$stamp"
echo "sfl install: installed $requirements into $venv"
"""

_RUN_SCRIPT = 'exec "{work:path}/@VENV_DIR@/bin/python" -m edge_client\n'


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


def default_configuration(
    config: FederationConfig,
    names: ClientResourceNames,
    *,
    region: str,
    device: DeviceDefaults = DeviceDefaults(),
) -> dict[str, str]:
    """Every configuration key's default, as strings, in ``CONFIGURATION_KEYS`` order."""
    values = {
        "modelsBucket": names.models_bucket,
        "updatesBucket": names.updates_bucket,
        "clientsTable": names.clients_table,
        "region": region,
        "endpointUrl": device.endpoint_url,
        "dataDir": device.data_dir,
        "task": config.task,
        "pollSeconds": str(config.poll_seconds),
        "heartbeatSeconds": str(config.heartbeat_seconds),
        "activeWindowSeconds": str(config.active_window_seconds),
        "ewmaB": str(config.ewma_b),
        "pythonInterpreter": device.python_interpreter,
        "systemSitePackages": "true" if device.system_site_packages else "false",
        "extraSitePackages": device.extra_site_packages,
        "pipOptions": device.pip_options,
    }
    return {k.key: values[k.key] for k in CONFIGURATION_KEYS}


def _setenv(step: str) -> dict[str, str]:
    return {k.variable: f"{{configuration:/{k.key}}}" for k in CONFIGURATION_KEYS if k.step == step}


def _script(template: str, root: str) -> str:
    for marker, value in (
        ("@VENV_DIR@", VENV_DIR),
        ("@ARCHIVE_ROOT@", root),
        ("@REQUIREMENTS_FILE@", REQUIREMENTS_FILE),
        ("@INSTALL_STAMP@", INSTALL_STAMP),
        ("@EXTRA_PTH@", EXTRA_SITE_PACKAGES_PTH),
    ):
        template = template.replace(marker, value)
    assert "@" not in template, template
    return template


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
) -> dict[str, Any]:
    """The edge client's recipe.

    ``artifact_uri`` is the client zip's ``s3://bucket/key``; ``archive_name`` is the key's
    file name, needed when it is not literal in the URI (a CDK token). The version is
    ``recipe_version(recipe, artifact_sha256)`` unless given (the CDK app passes one computed
    from the resolved recipe, so token names do not make it drift).
    """
    validate_component_name(component_name)
    if not artifact_uri.startswith("s3://") or len(artifact_uri) <= len("s3://"):
        raise RecipeError(f"artifact URI {artifact_uri!r}: must be 's3://<bucket>/<key>.zip'")
    if not _SHA256.match(artifact_sha256):
        raise RecipeError(f"artifact SHA-256 {artifact_sha256!r}: must be 64 lowercase hex digits")
    if not region or any(c.isspace() for c in region):
        raise RecipeError(f"region {region!r}: must be a region name such as 'eu-west-1'")
    root = archive_root(archive_name or artifact_uri.rsplit("/", 1)[-1])
    pythonpath = f"{{artifacts:decompressedPath}}/{root}"
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
            "DefaultConfiguration": default_configuration(
                config, names, region=region, device=device
            )
        },
        "Manifests": [
            {
                "Platform": {"os": "linux"},
                "Lifecycle": {
                    "Install": {
                        "Script": _script(_INSTALL_SCRIPT, root),
                        "Timeout": INSTALL_TIMEOUT_SECONDS,
                        "RequiresPrivilege": False,
                        "Setenv": _setenv("Install"),
                    },
                    "Run": {
                        "Script": _script(_RUN_SCRIPT, root),
                        "RequiresPrivilege": False,
                        "Setenv": {
                            "PYTHONPATH": pythonpath,
                            "PYTHONUNBUFFERED": "1",
                            "PYTHONNOUSERSITE": "1",
                            **_setenv("Run"),
                        },
                    },
                },
                "Artifacts": [
                    {
                        "Uri": artifact_uri,
                        "Unarchive": "ZIP",
                        "Permission": {"Read": "OWNER", "Execute": "NONE"},
                    }
                ],
            }
        ],
    }
    recipe["ComponentVersion"] = component_version or recipe_version(recipe, artifact_sha256)
    return recipe


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
