"""``sfl recipes``: write the edge client's Greengrass recipe (JSON + YAML), optionally its zip.

The settings come from ``cdk.json`` (contexts ``sfl`` and ``sfl_infra``, read and checked as
``cdk synth`` reads them, so the component is named as the stack names it); deployed names
default to placeholders to replace with the stack's outputs. The deployed stack registers its
own component version: these files are for the console or the GDK. ``--wheel-bundle DIR``
adds the offline option: a zip of the wheels in DIR as a second artifact, which Install then
uses with no package index.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PLACEHOLDER_PREFIX = "REPLACE_WITH_"
DEFAULT_OUT = Path("greengrass_recipes")
DEFAULT_CDK_JSON = Path("cdk.json")


def _placeholder(output_name: str) -> str:
    return f"{PLACEHOLDER_PREFIX}STACK_OUTPUT_{output_name}"


def _recipes(args: argparse.Namespace) -> int:
    import tempfile

    from sfl.build import app_code
    from sfl.build.artifact import ARCHIVE_NAME, build_client_artifact, build_wheel_bundle
    from sfl.build.recipes import DeviceDefaults, WheelBundle, build_recipe, write_recipes
    from sfl.core.deployment import StackConfig
    from sfl.core.resources import ResourceNames

    cdk_json = args.cdk_json if args.cdk_json is not None else DEFAULT_CDK_JSON
    # Read and checked as 'cdk synth' reads it; no cdk.json: the stack's defaults.
    stack = (
        StackConfig.from_cdk_json(cdk_json)
        if cdk_json.is_file()
        else StackConfig.from_context(lambda key: None)
    )
    # The task named by import path ships from the app's folder, as 'cdk synth' ships it.
    app = app_code.plan(
        stack.federation, app_root=cdk_json.resolve().parent if cdk_json.is_file() else None
    )
    names = ResourceNames(
        models_bucket=args.models_bucket,
        updates_bucket=args.updates_bucket,
        clients_table=args.clients_table,
        rounds_table="",  # devices never read the rounds table
    )
    with tempfile.TemporaryDirectory() as scratch:
        artifact_path = args.artifact_out or Path(scratch) / ARCHIVE_NAME
        artifact = build_client_artifact(artifact_path, app=app.for_place(app_code.DEVICE))
        bundle = None
        if args.wheel_bundle is not None:
            built = build_wheel_bundle(args.wheel_bundle, args.wheel_bundle_out)
            bundle = WheelBundle(uri=args.wheel_bundle_uri, sha256=built.sha256)
        recipe = build_recipe(
            stack.federation,
            names,
            region=args.region,
            component_name=args.component_name or stack.infra.resolved_component_name,
            artifact_uri=args.artifact_uri,
            artifact_sha256=artifact.sha256,
            device=DeviceDefaults(data_dir=args.data_dir),
            wheel_bundle=bundle,
        )
    for path in write_recipes(args.out, recipe):
        print(f"wrote {path}")
    if args.artifact_out:
        print(f"wrote {args.artifact_out} (sha256 {artifact.sha256})")
        print(f"upload it to {args.artifact_uri}")
    if bundle is not None:
        print(f"wrote {args.wheel_bundle_out} (sha256 {bundle.sha256})")
        print(f"upload it to {args.wheel_bundle_uri}")
    print(f"component {recipe['ComponentName']} version {recipe['ComponentVersion']}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``sfl recipes`` on the ``sfl`` command's subparsers."""
    from sfl.build.artifact import ARCHIVE_NAME, WHEEL_BUNDLE_NAME

    p = subparsers.add_parser(
        "recipes",
        help="write the edge client's Greengrass V2 recipe (JSON and YAML)",
        description=(
            "Write the edge client's Greengrass V2 recipe as JSON and YAML. The federation's "
            "settings come from cdk.json (context 'sfl'); stack-specific names default to "
            "REPLACE_WITH_... placeholders. A deployed stack registers its own version."
        ),
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the folder to write")
    p.add_argument(
        "--cdk-json",
        type=Path,
        default=None,
        help=f"read the federation config from this file's context (default: {DEFAULT_CDK_JSON})",
    )
    p.add_argument(
        "--component-name", help="default: as the stack names it ('<prefix>.EdgeClient')"
    )
    p.add_argument(
        "--region", default=f"{PLACEHOLDER_PREFIX}STACK_REGION", help="the stack's AWS region"
    )
    p.add_argument(
        "--models-bucket",
        default=_placeholder("ModelsBucketName"),
        help="the stack's models bucket",
    )
    p.add_argument(
        "--updates-bucket",
        default=_placeholder("UpdatesBucketName"),
        help="the stack's updates bucket",
    )
    p.add_argument(
        "--clients-table",
        default=_placeholder("ClientsTableName"),
        help="the stack's client registry table",
    )
    p.add_argument("--data-dir", default="data", help="relative to the component's work path")
    p.add_argument(
        "--artifact-uri",
        default=f"s3://{PLACEHOLDER_PREFIX}ARTIFACT_BUCKET/{ARCHIVE_NAME}",
        help="where the client zip is uploaded (s3://bucket/key.zip)",
    )
    p.add_argument(
        "--artifact-out", type=Path, help="also write the client zip here, to upload yourself"
    )
    p.add_argument(
        "--wheel-bundle",
        type=Path,
        metavar="DIR",
        help="offline install: bundle the wheels in DIR (pip download output) as a second "
        "artifact; Install then uses no package index",
    )
    p.add_argument(
        "--wheel-bundle-out",
        type=Path,
        default=Path(WHEEL_BUNDLE_NAME),
        help="where to write the wheel bundle zip",
    )
    p.add_argument(
        "--wheel-bundle-uri",
        default=f"s3://{PLACEHOLDER_PREFIX}ARTIFACT_BUCKET/{WHEEL_BUNDLE_NAME}",
        help="where the wheel bundle is uploaded (s3://bucket/key.zip)",
    )
    p.set_defaults(func=_recipes)
