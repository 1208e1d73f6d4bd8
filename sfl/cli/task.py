"""``sfl task check``: a task run through the contract on sample data, each step's verdict on
one line (:mod:`sfl.learning.tasks.check`), with the model's size against the device's limit
and the averager's sizing for this project's ``cdk.json``. Exit code 1 on any failure."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sfl.core.config import FederationConfig
    from sfl.core.deployment import InfraConfig


def _configs(cdk_json: Path) -> tuple[FederationConfig, InfraConfig]:
    """The project's federation and stack settings, or the defaults without a cdk.json."""
    import json

    from sfl.core.config import CONTEXT_KEY as FEDERATION_KEY
    from sfl.core.config import FederationConfig
    from sfl.core.deployment import CONTEXT_KEY as INFRA_KEY
    from sfl.core.deployment import InfraConfig, context_mapping

    if not cdk_json.exists():
        return FederationConfig(), InfraConfig()
    context = json.loads(cdk_json.read_text(encoding="utf-8")).get("context", {})
    source = f"{cdk_json} context"
    return (
        FederationConfig.from_mapping(
            context_mapping(context.get(FEDERATION_KEY), FEDERATION_KEY), source=source
        ),
        InfraConfig.from_mapping(context_mapping(context.get(INFRA_KEY), INFRA_KEY), source=source),
    )


def _device_check(body: bytes, state: Mapping[str, torch.Tensor]) -> str:
    from edge_client.global_model import check_global_model, size_limit

    check_global_model(body, version=0, reference=state)
    return f"a device accepts it ({len(body):,} of at most {size_limit(state):,} bytes)"


def _averager_check(federation: FederationConfig, infra: InfraConfig) -> Any:
    from sfl.core.deployment import size_averager

    def check(body: bytes, state: Mapping[str, torch.Tensor]) -> str:
        size = size_averager(federation, infra.replace(model_bytes=len(body)))
        return (
            f"memory {size.memory_mb} MB, /tmp {size.ephemeral_mib} MiB, timeout "
            f"{size.timeout_seconds} s, for {size.need.basis}"
        )

    return check


def _check(args: argparse.Namespace) -> int:
    from sfl.cli.app import import_from
    from sfl.learning.tasks.check import check_task

    federation, infra = _configs(args.cdk_json)
    import_from(args.cdk_json.parent)  # the app's packages, for a task named by import path
    task = args.task or federation.task
    print(f"checking task {task}")
    report = check_task(
        task,
        data_dir=args.data,
        model_checks=(
            ("device", _device_check),
            ("averager", _averager_check(federation, infra)),
        ),
    )
    for step in report.steps:
        print(step.line())
    failed = [s.name for s in report.steps if s.verdict.value == "fail"]
    print(f"task {task}: " + (f"failed ({', '.join(failed)})" if failed else "ok"))
    return 0 if report.ok else 1


def add_parser(sub: Any) -> None:
    task = sub.add_parser("task", help="a training task: check it against the contract")
    actions = task.add_subparsers(dest="task_action", required=True)
    check = actions.add_parser(
        "check",
        help="run the task through the contract on sample data, one line per step",
        description=__doc__,
    )
    check.add_argument(
        "--task", help="built-in name or import path 'package.module:Task' (default: cdk.json's)"
    )
    check.add_argument(
        "--data", type=Path, help="a client's data directory (default: the task's central data)"
    )
    check.add_argument(
        "--cdk-json",
        type=Path,
        default=Path("cdk.json"),
        help="the project's cdk.json, for the task and the averager's sizing",
    )
    check.set_defaults(func=_check)
