"""The edge client's Greengrass recipe and artifact: valid, deterministic, consumed, key-free."""

from __future__ import annotations

import json
import re
import subprocess
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from edge_client.settings import parse_settings
from sfl import artifact, recipes
from sfl.config import FederationConfig
from sfl.recipes import DeviceDefaults, RecipeError, build_recipe, write_recipes
from sfl.resources import ResourceNames

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "sfl" / "schemas" / "recipe.schema.json").read_text())
NAMES = ResourceNames(
    models_bucket="sfl-models-abc",
    updates_bucket="sfl-updates-abc",
    clients_table="sfl-clients-abc",
    rounds_table="sfl-rounds-abc",
)
SHA_A = "a" * 64
SHA_B = "b" * 64
URI = "s3://cdk-assets-bucket/assets/sfl-edge-client.zip"


def recipe_for(
    config: FederationConfig | None = None,
    *,
    sha: str = SHA_A,
    name: str = "com.example.EdgeClient",
    **kwargs: Any,
) -> dict[str, Any]:
    return build_recipe(
        config or FederationConfig(),
        NAMES,
        region="eu-west-1",
        component_name=name,
        artifact_uri=kwargs.pop("artifact_uri", URI),
        artifact_sha256=sha,
        **kwargs,
    )


VARIANTS = {
    "defaults": lambda: recipe_for(),
    "tuned": lambda: recipe_for(
        FederationConfig(task="mnist", poll_seconds=2.5, heartbeat_seconds=30, ewma_b=0.5),
        name="org.lab.fl.Client-2",
        device=DeviceDefaults(data_dir="/srv/fl", system_site_packages=True),
    ),
}


def written(tmp_path: Path, recipe: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    json_path, yaml_path = write_recipes(tmp_path, recipe)
    yield json_path.name, json.loads(json_path.read_text())
    yield yaml_path.name, yaml.safe_load(yaml_path.read_text())


def strings(value: Any) -> Iterator[str]:
    """Every key and string value in a recipe."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


# --- schema --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generated_recipes_validate_as_json_and_yaml(variant: str, tmp_path: Path) -> None:
    recipe = VARIANTS[variant]()
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for name, loaded in written(tmp_path, recipe):
        assert loaded == recipe, f"{name} does not round-trip"
        validator.validate(loaded)


def test_committed_example_recipes_validate() -> None:
    files = sorted((REPO / "greengrass_recipes").glob("*.json")) + sorted(
        (REPO / "greengrass_recipes").glob("*.yaml")
    )
    assert len(files) >= 2
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for path in files:
        loaded = (
            json.loads(path.read_text())
            if path.suffix == ".json"
            else yaml.safe_load(path.read_text())
        )
        validator.validate(loaded)
        assert all(
            v.startswith("REPLACE_WITH_")
            for k, v in loaded["ComponentConfiguration"]["DefaultConfiguration"].items()
            if k in {"modelsBucket", "updatesBucket", "clientsTable", "region"}
        ), f"{path.name}: stack-specific names must be marked placeholders"


def test_schema_rejects_what_greengrass_or_we_would_not_accept() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    recipe = recipe_for()
    numeric = json.loads(json.dumps(recipe))
    numeric["ComponentConfiguration"]["DefaultConfiguration"]["pollSeconds"] = 10.0
    reserved = {**recipe, "ComponentName": "aws.greengrass.EdgeClient"}
    no_tes = {**recipe, "ComponentDependencies": {}}
    for bad in (numeric, reserved, no_tes):
        assert not validator.is_valid(bad)


# --- component name and version ------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["aws.greengrass.EdgeClient", "AWS.Greengrass.X", "aws.greengrass"]
)
def test_reserved_component_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(repr(name)) + r".*reserved"):
        recipe_for(name=name)


@pytest.mark.parametrize("name", ["EdgeClient", "com..example", "com.example.Edge Client", ".x.y"])
def test_component_names_must_be_reverse_dns(name: str) -> None:
    with pytest.raises(RecipeError, match="reverse-DNS"):
        recipe_for(name=name)


def test_version_is_deterministic_and_follows_code_and_recipe() -> None:
    base = recipe_for()["ComponentVersion"]
    assert recipe_for()["ComponentVersion"] == base
    assert re.fullmatch(r"0\.1\.\d+", base) and int(base.rsplit(".", 1)[1]) < 2**31
    assert recipe_for(sha=SHA_B)["ComponentVersion"] != base  # new client code
    assert recipe_for(FederationConfig(poll_seconds=3.0))["ComponentVersion"] != base
    assert recipe_for(component_version="2.0.0")["ComponentVersion"] == "2.0.0"


def test_version_ignores_server_only_knobs() -> None:
    """Local epochs and lr reach clients in each round's assignment, not the recipe."""
    assert (
        recipe_for(FederationConfig(local_epochs=7, lr=0.2))["ComponentVersion"]
        == recipe_for()["ComponentVersion"]
    )


# --- configuration: strings, consumed, interpolated -----------------------------------------


def lifecycle(recipe: dict[str, Any]) -> dict[str, Any]:
    lc: dict[str, Any] = recipe["Manifests"][0]["Lifecycle"]
    return lc


def test_default_configuration_values_are_all_strings() -> None:
    for variant in VARIANTS.values():
        config = variant()["ComponentConfiguration"]["DefaultConfiguration"]
        assert config and all(isinstance(v, str) for v in config.values())


def test_every_configuration_key_is_used_exactly_once_by_a_lifecycle_step() -> None:
    recipe = recipe_for()
    keys = set(recipe["ComponentConfiguration"]["DefaultConfiguration"])
    used = [key for ns, key in recipes.placeholders(lifecycle(recipe)) if ns == "configuration"]
    assert sorted(used) == sorted(f"/{k}" for k in keys)


def test_run_environment_is_what_the_edge_client_reads(tmp_path: Path) -> None:
    config = FederationConfig(task="mnist", poll_seconds=2.5, heartbeat_seconds=30, ewma_b=0.5)
    recipe = recipe_for(config, device=DeviceDefaults(data_dir=str(tmp_path)))
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    env = {
        var: recipes.PLACEHOLDER.sub(lambda m: defaults[m[2].lstrip("/")], value)
        for var, value in lifecycle(recipe)["Run"]["Setenv"].items()
        if not var.startswith("PYTHON")
    }
    settings = parse_settings([], {**env, "AWS_IOT_THING_NAME": "core-7"})
    assert settings.client_id == "core-7"
    assert (settings.models_bucket, settings.updates_bucket, settings.clients_table) == (
        NAMES.models_bucket,
        NAMES.updates_bucket,
        NAMES.clients_table,
    )
    assert settings.region == "eu-west-1" and settings.endpoint_url is None
    assert settings.data_dir == tmp_path and settings.task == "mnist"
    assert (settings.poll_seconds, settings.heartbeat_seconds, settings.ewma_b) == (2.5, 30, 0.5)
    assert settings.active_window_seconds == config.active_window_seconds


def test_placeholders_are_well_formed() -> None:
    recipe = recipe_for()
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    found = recipes.placeholders(recipe)
    assert found
    for namespace, key in found:
        if namespace == "configuration":
            assert key.startswith("/") and key[1:] in defaults, key
        else:
            assert key in recipes.PLACEHOLDERS[namespace], (namespace, key)
    # Nothing that looks like a placeholder but escaped the pattern (a typo'd brace).
    text = json.dumps(recipe)
    assert text.count("{configuration") == sum(ns == "configuration" for ns, _ in found)
    assert text.count("{work") + text.count("{artifacts") == sum(
        ns in {"work", "artifacts"} for ns, _ in found
    )


def test_run_uses_the_venv_and_the_unpacked_artifact() -> None:
    run = lifecycle(recipe_for())["Run"]
    assert run["Script"].strip() == 'exec "{work:path}/venv/bin/python" -m edge_client'
    assert run["Setenv"]["PYTHONPATH"] == "{artifacts:decompressedPath}/sfl-edge-client"
    install = lifecycle(recipe_for())["Install"]
    assert install["Timeout"] >= 1_800 and install["RequiresPrivilege"] is False
    assert "{artifacts:decompressedPath}/sfl-edge-client/requirements-edge.txt" in install["Script"]


def test_lifecycle_scripts_are_valid_posix_sh() -> None:
    for step in ("Install", "Run"):
        script = lifecycle(recipe_for())[step]["Script"]
        checked = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert checked.returncode == 0, (step, checked.stderr)


def test_archive_folder_comes_from_the_s3_key() -> None:
    recipe = recipe_for(artifact_uri="s3://bucket/0f3a9c.zip")
    assert lifecycle(recipe)["Run"]["Setenv"]["PYTHONPATH"].endswith("/0f3a9c")
    with pytest.raises(RecipeError, match="archive_name"):
        recipe_for(artifact_uri="s3://bucket/${Token[TOKEN.12]}")
    tokenised = recipe_for(artifact_uri="s3://${Token[TOKEN.1]}/k.zip", archive_name="k.zip")
    assert lifecycle(tokenised)["Run"]["Setenv"]["PYTHONPATH"].endswith("/k")


def test_artifact_uri_must_be_s3() -> None:
    with pytest.raises(RecipeError, match="s3://"):
        recipe_for(artifact_uri="https://example.com/sfl-edge-client.zip")


# --- no credentials ---------------------------------------------------------------------------

CREDENTIAL_WORDS = re.compile(
    r"secret|password|passwd|private.?key|access.?key|session.?token|credential", re.IGNORECASE
)
ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_credentials_anywhere(variant: str) -> None:
    recipe = VARIANTS[variant]()
    for text in strings(recipe):
        assert not ACCESS_KEY_ID.search(text), text
        assert not CREDENTIAL_WORDS.search(text), text
    setenv = {var for step in lifecycle(recipe).values() for var in step.get("Setenv", {})}
    assert not setenv & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert recipe["ComponentDependencies"]["aws.greengrass.TokenExchangeService"] == {
        "VersionRequirement": ">=2.0.0 <3.0.0",
        "DependencyType": "HARD",
    }


# --- the artifact -----------------------------------------------------------------------------


def test_artifact_is_deterministic(tmp_path: Path) -> None:
    first = artifact.build_client_artifact(tmp_path / "a" / "sfl-edge-client.zip")
    second = artifact.build_client_artifact(tmp_path / "b" / "sfl-edge-client.zip")
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.archive_name == "sfl-edge-client.zip"


def test_artifact_holds_the_client_and_nothing_else() -> None:
    data, _ = artifact.client_artifact()
    with zipfile.ZipFile(BytesIO(data)) as archive:
        infos = archive.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {
        "edge_client/__main__.py",
        "edge_client/settings.py",
        "sfl/__init__.py",
        "sfl/codec.py",
        "sfl/layout.py",
        "sfl/registry.py",
        "sfl/tasks/digits.py",
        "requirements-edge.txt",
    } <= set(names)
    for name in names:
        assert not name.startswith(("sfl/local/", "lambdas/", "tests/", "infra/")), name
        assert name not in {"sfl/cli.py", "sfl/averager.py", "sfl/initiator.py"}, name
        assert "__pycache__" not in name


def test_edge_requirements_pin_what_runtime_pins() -> None:
    runtime = {
        line.split("==")[0].split("[")[0].lower(): line.split("==")[1]
        for line in (REPO / "requirements" / "runtime.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    pins = [line for line in artifact.edge_requirements().splitlines() if not line.startswith("#")]
    assert pins, "requirements-edge.txt pins nothing"
    for pin in pins:
        name, version = pin.split("==")
        assert runtime[name] == version, pin
    assert {p.split("==")[0] for p in pins} >= {"torch", "boto3", "safetensors", "numpy"}
    assert "moto" not in {p.split("==")[0] for p in pins}
