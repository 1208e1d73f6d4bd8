"""``sfl config``: every configuration key, its default and allowed values; ``show | set |
unset | history`` change a running federation's configuration between rounds.

Also how every command takes configuration keys: ``--set KEY=VALUE``, checked by the one
settings machinery (:mod:`sfl.core.settings`) with its wording. What checks and changes the
configuration is imported when a command runs, not to build the parser.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sfl.cli.operator import connection_flags, run, when

if TYPE_CHECKING:
    from rich.console import Console

    from sfl.ops.federation import Federation


def config_pairs(items: Iterable[str], *, flag: str = "--set") -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` items as (key, text) pairs; the values are parsed where they are used."""
    from sfl.core.config import ConfigError

    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE (keys: see 'sfl config')")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def add_set_flag(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a configuration key (see 'sfl config'), e.g. --set norm_bound_factor=0",
    )


def _reference(args: argparse.Namespace) -> int:
    from sfl.core import params as rule_params
    from sfl.core import task_params
    from sfl.core.config import describe

    rows = describe()
    if args.json:
        print(
            json.dumps(
                [dict(zip(("key", "default", "allowed", "meaning"), r, strict=True)) for r in rows],
                indent=2,
            )
        )
        return 0
    for key, default, allowed, meaning in rows:
        print(f"{key:<26} {default:<14} {meaning}\n{'':<26} allowed: {allowed}")
    print("\naggregation_params, per rule (a JSON object; unknown names are refused):")
    for rule, name, default, meaning in rule_params.describe():
        print(f"  {rule:<13} {name:<19} {default:<8} {meaning}")
    print("\ntask_params, per task (a JSON object; unknown names are refused; docs/tasks.md):")
    for task, name, default, meaning in task_params.describe():
        print(f"  {task:<13} {name:<19} {default:<8} {meaning}")
    return 0


def _config_action(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from rich.table import Table

    from sfl.core.config import ConfigError
    from sfl.ops import actions

    if args.action == "show":
        shown = actions.config_show(fed)
        if args.json:
            return shown
        out.print(f"runtime config version {shown['version']}")
        if shown["error"]:
            out.print(f"[red]not valid with the deployed config: {shown['error']}[/]")
        table = Table()
        for column in ("key", "value", "source", "cdk.json (deployed)"):
            table.add_column(column)
        for k in shown["keys"]:
            runtime = k["source"] == "runtime"
            table.add_row(
                k["key"], str(k["value"]),
                "[bold]runtime[/]" if runtime else "deployed",
                str(k["deployed"]) if runtime and k["deployed"] != k["value"] else "",
            )  # fmt: skip
        out.print(table)
        return None
    if args.action == "history":
        versions = actions.config_history(fed)
        if args.json:
            return versions
        if not versions:
            out.print("no runtime changes: every key is as deployed")
        for v in versions:
            changed = ", ".join(
                f"{k}={'(deployed)' if val is None else val}" for k, val in v["changed"].items()
            )
            out.print(f"version {v['version']} at {when(v['set_at'])}: {changed} {v['note']}")
        return None
    changes = dict(config_pairs(args.pairs, flag="set")) if args.action == "set" else {}
    unset = list(args.pairs) if args.action == "unset" else []
    if not changes and not unset:
        raise ConfigError(f"sfl config {args.action}: name at least one key")
    result = actions.config_set(fed, changes, unset, note=args.note)
    if args.json:
        return result
    changed = ", ".join(
        f"{k}={'(deployed)' if v is None else v}" for k, v in result["changed"].items()
    )
    out.print(f"runtime config version {result['version']}: {changed}; the next round uses it")
    return None


def add_parser(sub: Any) -> None:
    """``sfl config`` alone prints the reference; ``show | set | unset | history`` act on a
    federation's runtime configuration."""
    cfg = sub.add_parser(
        "config",
        help="every configuration key, default and allowed values; show | set | unset | history "
        "change a federation's configuration between rounds",
    )
    cfg.add_argument("--json", action="store_true", help="machine-readable output")
    cfg.add_argument(
        "action",
        nargs="?",
        choices=("show", "set", "unset", "history"),
        help="show the configuration in force, set or unset keys, or list the versions; "
        "none: the reference of every key",
    )
    cfg.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="for set: KEY=VALUE; unset: KEY")
    cfg.add_argument("--note", default="", help="why (kept with the version)")
    connection_flags(cfg, json_flag=False)

    def dispatch(args: argparse.Namespace) -> int:
        if args.action is None:
            return _reference(args)
        return run(_config_action, args)

    cfg.set_defaults(func=dispatch)
