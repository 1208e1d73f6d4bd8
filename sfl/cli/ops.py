"""The operator's ``sfl`` commands: status, rounds, watch, devices, models, pause, resume,
start-round, config show/set/unset/history, eval-data, report, and ``local up``.

Each finds the federation (``sfl.ops.federation.connect``), prints a readable view with
rich, or JSON with ``--json``; a failure to connect is one clear line and exit code 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from sfl.core.config import ConfigError
from sfl.ops import actions, views
from sfl.ops.federation import DEFAULT_STACK, STACK_ENV, Federation, OpsError, connect, translated

Handler = Callable[[Federation, argparse.Namespace, Console], Any]


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 120)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%m-%d %H:%M:%S")


def _num(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str, sort_keys=True))


# --- views --------------------------------------------------------------------------------


def _status(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    s = views.status(fed)
    if args.json:
        return s
    where = "local mode" if s["local"] else s["region"]
    out.print(f"[bold]{s['stack']}[/] ({where}), experiment [bold]{s['experiment']}[/]")
    state = "[red]PAUSED[/]" if s["paused"] else "[green]running[/]"
    if s["paused"] and s["pause_reason"]:
        state += f" ({s['pause_reason']})"
    out.print(f"federation:  {state}, runtime config version {s['config_version']}")
    r = s["round"]
    if r is None:
        out.print("round:       none yet")
    else:
        line = f"round:       {r['round']} {r['status']}"
        if r["status"] in ("OPEN", "AGGREGATING"):
            left = r["deadline_at"] - s["now"]
            line += f", {r['answered']}/{r['selected']} answered, deadline in {left:.0f} s"
        else:
            line += f" at {_when(r['finished_at'])}, {r['accepted']}/{r['selected']} accepted"
        out.print(line)
    out.print(
        f"rounds:      {s['rounds_closed']} closed, {s['rounds_abandoned']} abandoned"
        + (
            f"; rollback to version {s['rollback_to']} pending"
            if s["rollback_to"] is not None
            else ""
        )
    )
    out.print(f"devices:     {s['active_devices']} active of {s['known_devices']} known")
    m = s["latest_model"]
    if m is None:
        out.print("model:       version 0 (no round closed yet)")
    else:
        out.print(
            f"model:       version {m['version']} (round {m['round']}), held-out accuracy "
            f"{_num(m['accuracy'])}, clients' {_num(m['client_accuracy'])}"
            + (f"; promoted: {s['promoted_version']}" if s["promoted_version"] is not None else "")
        )
    firing = [a for a in s["alarms"] if a["state"] == "ALARM"]
    if not s["alarms"]:
        out.print("alarms:      none defined")
    elif firing:
        out.print("alarms:      [red]" + ", ".join(a["name"] for a in firing) + "[/] in ALARM")
    else:
        out.print(f"alarms:      none in ALARM ({len(s['alarms'])} alarms)")
    if s["dashboard"]:
        out.print(f"dashboard:   {s['dashboard']}")
    return None


def _rounds_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=None, show_lines=False)
    for column, justify in (
        ("round", "right"), ("status", "left"), ("model", "right"), ("cfg", "right"),
        ("answered", "right"), ("accepted", "right"), ("rejected", "left"),
        ("started UTC", "left"), ("time s", "right"), ("accuracy", "right"),
        ("client acc", "right"),
    ):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        rejected = ", ".join(f"{k} {v}" for k, v in r["rejections"].items()) or "-"
        model = f"{r['base_version']}->{r['model_version']}" if r["model_version"] else "-"
        status = r["status"] if r["status"] != "ABANDONED" else f"[red]{r['status']}[/]"
        table.add_row(
            str(r["round"]), status, model, str(r["config_version"]),
            f"{r['answered']}/{r['selected']}", str(r["accepted"]), rejected,
            _when(r["started_at"]), f"{r['duration_seconds']:.1f}", _num(r["accuracy"]),
            _num(r["client_accuracy"]),
        )  # fmt: skip
    return table


def _rounds(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    rows = [views.round_row(r) for r in views.rounds_of(fed)]
    if args.last:
        rows = rows[-args.last :]
    if args.json:
        return rows
    if not rows:
        out.print("no rounds yet")
        return None
    out.print(_rounds_table(rows))
    return None


def _devices(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    rows = views.devices(fed)
    if args.json:
        return rows
    table = Table()
    for column in ("device", "active", "last seen", "turnaround s", "picked", "answered",
                   "missed", "rejected"):  # fmt: skip
        table.add_column(column)
    for d in rows:
        table.add_row(
            d["client_id"],
            "yes" if d["active"] else "[red]no[/]",
            _ago(d["last_seen_seconds_ago"]),
            _num(d["ewma_turnaround"], ".1f"),
            str(d["rounds_picked"]),
            str(d["rounds_answered"]),
            str(d["rounds_missed"]),
            ", ".join(f"{k} {v}" for k, v in d["rejected"].items()) or "-",
        )
    out.print(table)
    return None


def _watch(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    """Live progress of the open round and accuracy per round, until ``--until-round`` has
    finished, ``--timeout`` passes or Ctrl-C."""
    deadline = time.time() + args.timeout if args.timeout else None
    shown: set[int] = set()
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[deadline]}"), console=out, transient=not args.json,
        disable=args.json,
    )  # fmt: skip
    task_ids: dict[int, Any] = {}
    finished = [r.round for r in views.rounds_of(fed) if r.status.finished]
    shown.update(finished[: -args.history] if args.history else finished)
    with progress:
        while True:
            now = time.time()
            history = views.rounds_of(fed)
            for r in history:
                row = views.round_row(r, now)
                if r.status.finished and r.round not in shown:
                    shown.add(r.round)
                    if r.round in task_ids:
                        progress.remove_task(task_ids.pop(r.round))
                    if args.json:
                        print(json.dumps(row, default=str, sort_keys=True), flush=True)
                    else:
                        progress.console.print(
                            f"round {r.round} {row['status']}: {row['accepted']}/{row['selected']}"
                            f" accepted, {row['duration_seconds']:.1f} s, accuracy "
                            f"{_num(row['accuracy'])} (clients {_num(row['client_accuracy'])})"
                            + (f", {row['abandon_reason']}" if row["abandon_reason"] else "")
                        )
                elif not r.status.finished and not args.json:
                    left = f"deadline in {max(0.0, r.deadline_at - now):.0f} s"
                    if r.round not in task_ids:
                        task_ids[r.round] = progress.add_task(
                            f"round {r.round} {r.status}", total=r.num_selected, deadline=left
                        )
                    progress.update(
                        task_ids[r.round], completed=r.num_answered, deadline=left,
                        description=f"round {r.round} {r.status}",
                    )  # fmt: skip
            if args.until_round and args.until_round in shown:
                return None
            if deadline is not None and time.time() >= deadline:
                raise OpsError(
                    f"--timeout {args.timeout:g} s passed"
                    + (f" before round {args.until_round} finished" if args.until_round else "")
                )
            time.sleep(args.interval)


# --- models ---------------------------------------------------------------------------------


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
                str(m["config_version"]), _num(m["accuracy"]), _num(m["client_accuracy"]),
                _when(m["written_at"]), "[green]yes[/]" if m["promoted"] else "",
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


# --- control ---------------------------------------------------------------------------------


def _pause(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    result = actions.pause(fed, args.reason)
    if args.json:
        return result
    out.print("paused: no new rounds start; an open round finishes ('sfl resume' to go on)")
    return None


def _resume(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    result = actions.resume(fed)
    if args.json:
        return result
    out.print("resumed: the next scheduled tick (or 'sfl start-round') starts a round")
    return None


def _start_round(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    result = actions.start_round(fed)
    if args.json:
        return result
    if result.get("started"):
        out.print(
            f"round {result['round']} started with {len(result['selected'])} client(s): "
            f"{', '.join(result['selected'])} (initiator ran {result['ran']})"
        )
    else:
        out.print(f"no round started: {result.get('reason')} (initiator ran {result['ran']})")
    return None


def _config_action(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
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
            out.print(f"version {v['version']} at {_when(v['set_at'])}: {changed} {v['note']}")
        return None
    changes = dict(_key_value(p) for p in args.pairs) if args.action == "set" else {}
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


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{item!r}: expected KEY=VALUE (keys: see 'sfl config')")
    return key.strip(), value.strip()


def _eval_data(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    result = actions.eval_upload(fed, task=args.task, path=args.file)
    if args.json:
        return result
    out.print(
        f"uploaded {result['examples']} held-out examples to {result['key']}; the averager "
        "scores each new model on them"
    )
    return None


def _report(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops.report import write_report

    result = write_report(fed, args.out)
    if args.json:
        return result
    out.print(f"{result['rounds']} rounds: {result['history']}")
    for chart in result["charts"]:
        out.print(f"  {chart}")
    return None


# --- wiring ----------------------------------------------------------------------------------


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Connect, run one command, print; a failure is one line on stderr and exit code 1."""
    out = _console()
    try:
        with translated("aws", args.command, args.endpoint):
            fed = connect(
                args.stack, endpoint_url=args.endpoint, region=args.region, profile=args.profile
            )
            data = handler(fed, args, out)
    except (OpsError, ConfigError) as e:
        print(f"sfl {args.command}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    if data is not None:
        _emit_json(data)
    return 0


def connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", help=f"stack name (default: ${STACK_ENV}, else {DEFAULT_STACK})")
    p.add_argument("--endpoint", help="local mode: the endpoint 'sfl local up' printed")
    p.add_argument("--region", help="AWS region (default: your AWS settings)")
    p.add_argument("--profile", help="AWS profile (default: your AWS settings)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parsers(sub: Any) -> None:
    def command(
        name: str, handler: Handler, help: str, *, flags: bool = True
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        if flags:
            connection_flags(p)
        p.set_defaults(func=lambda args: run(handler, args))
        return p

    command("status", _status, "the federation now: round, devices, model, alarms")
    p = command("rounds", _rounds, "every round: outcome, answers, rejections, accuracy")
    p.add_argument("--last", type=int, default=0, help="only the last N rounds")
    p = command("watch", _watch, "live progress of the open round and accuracy per round")
    p.add_argument("--until-round", type=int, default=0, help="stop once round N has finished")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after S seconds")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
    p.add_argument("--history", type=int, default=5, help="also show the last N finished rounds")
    command("devices", _devices, "every device: active, last seen, turnaround, answers, rejections")

    models = command(
        "models", _models, "model versions: list, pull, promote, rollback", flags=False
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

    p = command("pause", _pause, "start no new rounds (an open round finishes)")
    p.add_argument("--reason", default="", help="shown by 'sfl status'")
    command("resume", _resume, "start rounds again")
    command("start-round", _start_round, "run the initiator now instead of waiting")
    p = command("report", _report, "history.json and charts (accuracy, time, cost) into a folder")
    p.add_argument("--out", type=Path, required=True)
    p = command("eval-data", _eval_data, "upload the held-out set the averager scores models on")
    p.add_argument("action", choices=("upload",))
    source = p.add_mutually_exclusive_group()
    source.add_argument("--task", help="the task's own test split (default: the deployed task)")
    source.add_argument("--file", type=Path, help="a safetensors file of x [N, ...] and y [N]")

    local = sub.add_parser("local", help="local mode: a running federation on this machine")
    local_sub = local.add_subparsers(dest="local_action", required=True)
    up = local_sub.add_parser("up", help="run the federation until Ctrl-C; prints its endpoint")
    up.add_argument("--clients", type=int, default=4)
    up.add_argument("--task", default="digits")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--stack", default=DEFAULT_STACK)
    up.add_argument("--schedule-seconds", type=float, default=2.0, help="the initiator's period")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    up.add_argument("--env-file", type=Path, help="also write the shell exports here")
    up.add_argument("--out", type=Path, default=Path("runs/local"))
    up.set_defaults(func=_local_up)


def add_config_actions(cfg: argparse.ArgumentParser, reference: Callable[..., int]) -> None:
    """``sfl config`` alone prints the reference; ``show | set | unset | history`` act on a
    federation's runtime configuration."""
    cfg.add_argument("action", nargs="?", choices=("show", "set", "unset", "history"))
    cfg.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="for set: KEY=VALUE; unset: KEY")
    cfg.add_argument("--note", default="", help="why (kept with the version)")
    cfg.add_argument("--stack")
    cfg.add_argument("--endpoint")
    cfg.add_argument("--region")
    cfg.add_argument("--profile")

    def dispatch(args: argparse.Namespace) -> int:
        if args.action is None:
            return int(reference(args))
        return run(_config_action, args)

    cfg.set_defaults(func=dispatch)


def _local_up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from sfl.local.fleet import FleetOptions, LocalFleet

    options = FleetOptions(
        out=args.out,
        clients=args.clients,
        task=args.task,
        seed=args.seed,
        stack=args.stack,
        schedule_seconds=args.schedule_seconds,
        config_overrides=tuple(_key_value(item) for item in args.set),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalFleet(options) as fleet:
        exports = "\n".join(f"export {k}={v}" for k, v in sorted(fleet.client_env().items()))
        if args.env_file:
            args.env_file.write_text(exports + "\n")
        print(f"sfl local up: stack {args.stack}, {args.clients} clients, task {args.task}")
        print(f"endpoint: {fleet.endpoint_url}")
        print("in another shell:\n" + exports)
        print(
            f"then: sfl status --endpoint {fleet.endpoint_url}   (Ctrl-C here stops it)", flush=True
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        print("sfl local up: stopping (clients finish the step they are in)", flush=True)
    return 0
