"""``sfl models list | pull | promote | rollback``: the federation's model versions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sfl.cli.operator import command, connection_flags, num, when
from sfl.ops import actions, views
from sfl.ops.federation import Federation


def _models(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    if args.models_action == "list":
        rows = views.models(fed)
        if args.json:
            return rows
        table = Table()
        for column in ("version", "kind", "parent", "round", "participants", "cfg",
                       "accuracy", "client acc", "written UTC", "promoted"):  # fmt: skip
            table.add_column(column)
        for m in rows:
            table.add_row(
                str(m["version"]), m["kind"], "-" if m["parent"] is None else str(m["parent"]),
                "-" if m["round"] is None else str(m["round"]), str(len(m["participants"])),
                str(m["config_version"]), num(m["accuracy"]), num(m["client_accuracy"]),
                when(m["written_at"]), "[green]yes[/]" if m["promoted"] else "",
            )  # fmt: skip
        out.print(table)
        return None
    if args.models_action == "pull":
        result = actions.pull(fed, args.version, args.out)
        message = (
            f"wrote model version {result['version']} to {result['path']} ({result['bytes']} bytes)"
        )
    elif args.models_action == "promote":
        result = actions.promote(fed, args.version)
        message = f"version {result['promoted']} promoted: devices read it at {result['key']}"
    elif args.models_action == "rollback" and args.cancel:
        result = actions.cancel_rollback(fed)
        message = "rollback request cancelled"
    else:
        result = actions.rollback(fed, args.version)
        message = (
            f"the next round starts from version {result['rollback_to']} (written again as a "
            f"new version after {result['newest']}; the open round, if any, finishes first)"
        )
    if args.json:
        return result
    out.print(message)
    return None


def add_parser(sub: Any) -> None:
    models = command(
        sub, "models", _models, "model versions: list, pull, promote, rollback", flags=False
    )
    actions_ = models.add_subparsers(dest="models_action", required=True)
    connection_flags(actions_.add_parser("list", help="every version with its lineage"))
    pull = actions_.add_parser("pull", help="download a version (default: promoted, else newest)")
    pull.add_argument("version", type=int, nargs="?")
    pull.add_argument("--out", type=Path, required=True)
    promote = actions_.add_parser("promote", help="the version devices use for inference")
    promote.add_argument("version", type=int)
    rollback = actions_.add_parser("rollback", help="the next round starts from VERSION")
    rollback.add_argument("version", type=int, nargs="?", help="default: the newest's parent")
    rollback.add_argument("--cancel", action="store_true", help="drop a pending rollback")
    for action in (pull, promote, rollback):
        connection_flags(action)
