"""The stack's fleet deployment owns the device-owned keys for the fleet: what it sets is
merged, every other key the recipe defines is reset, so removing a key from
``sfl_infra.device_configuration`` returns devices to the recipe's default."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import assertions
from stack_template import REPO_ROOT, bare_app_stack

from infra.edge import FederationEdge
from sfl.core.config import FederationConfig
from sfl.core.device_settings import CONFIGURATION_KEYS
from sfl.core.resources import ResourceNames
from tests.test_nucleus import resolve_configuration

NAMES = ResourceNames(
    models_bucket="models-bucket",
    updates_bucket="updates-bucket",
    clients_table="clients-table",
    rounds_table="rounds-table",
)
NOTICE_TOPIC = "sfl/Sfl-Test/default/rounds"


def synthesized(device_configuration: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The deployment's configuration update and the recipe's defaults, from the template."""
    stack = bare_app_stack()
    edge = FederationEdge(
        stack,
        "Edge",
        component_name="com.example.sfl.EdgeClient",
        notice_topic=NOTICE_TOPIC,
        federation=FederationConfig(),
        resource_names=NAMES,
        source_root=REPO_ROOT,
        device_configuration=device_configuration,
    )
    template = assertions.Template.from_stack(stack)
    (deployment,) = template.find_resources("AWS::GreengrassV2::Deployment").values()
    ((_, spec),) = deployment["Properties"]["Components"].items()
    update = spec["ConfigurationUpdate"]
    return {
        "merge": json.loads(update["Merge"]) if "Merge" in update else None,
        "reset": tuple(update.get("Reset", ())),
    }, edge.recipe["ComponentConfiguration"]["DefaultConfiguration"]


def test_the_deployment_resets_every_recipe_key_the_stack_does_not_set() -> None:
    update, defaults = synthesized({"dataDir": "/mnt/fl-data", "pipOptions": "--no-index"})
    assert update["merge"] == {"dataDir": "/mnt/fl-data", "pipOptions": "--no-index"}
    # The IPC access control too: every deployment puts back the recipe's, so a device never
    # keeps a topic an earlier version allowed.
    assert set(update["reset"]) == {f"/{k.key}" for k in CONFIGURATION_KEYS} - {
        "/dataDir",
        "/pipOptions",
    } | {"/accessControl"}
    assert {p.removeprefix("/") for p in update["reset"]} <= set(defaults)

    nothing_set, _ = synthesized({})
    assert nothing_set["merge"] is None
    assert sorted(nothing_set["reset"]) == sorted(f"/{k}" for k in defaults)


def test_removing_a_key_from_device_configuration_reverts_devices_to_the_default() -> None:
    """Two revisions of the stack's deployment applied as the nucleus applies them
    (``KernelConfigResolver``: reset, then the version's defaults under, then the merge).
    A key the recipe does not define (an operator's own) is not the stack's to reset."""
    first, defaults = synthesized({"dataDir": "/mnt/fl-data", "pipOptions": "--no-index"})
    device = resolve_configuration(
        {"operatorNote": "rack 4"}, defaults, first["merge"], first["reset"]
    )
    assert device["dataDir"] == "/mnt/fl-data" and device["pipOptions"] == "--no-index"

    second, _ = synthesized({"pipOptions": "--no-index"})
    device = resolve_configuration(device, defaults, second["merge"], second["reset"])
    assert device["dataDir"] == defaults["dataDir"] == "data"
    assert device["pipOptions"] == "--no-index"
    assert device["operatorNote"] == "rack 4"

    # Without the reset (the stack before), the removed key's value stayed on every device.
    merged_only = resolve_configuration(
        resolve_configuration({}, defaults, first["merge"]), defaults, second["merge"]
    )
    assert merged_only["dataDir"] == "/mnt/fl-data"
