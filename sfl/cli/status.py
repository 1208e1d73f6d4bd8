"""The operator's views of a federation: ``sfl status``, ``rounds``, ``watch``, ``devices``
and ``report``; each prints a readable view with rich, or JSON with ``--json``. What reads
the federation and draws the views is imported when a command runs, not to build the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from sfl.cli.args import number, output_path, whole
from sfl.cli.operator import command, num, when
from sfl.ops.defaults import DEFAULT_LAST

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table
    from rich.text import Text

    from sfl.ops import greengrass
    from sfl.ops.federation import Federation


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _status(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.core.privacy_ledger import describe as describe_spending
    from sfl.ops import views

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
            line += f" at {when(r['finished_at'])}, {r['accepted']}/{r['selected']} accepted"
        out.print(line)
    counted = (
        f"{s['rounds_total']} in all; of the newest {s['rounds_counted']}: "
        if s["rounds_total"] > s["rounds_counted"]
        else ""
    )
    out.print(
        f"rounds:      {counted}{s['rounds_closed']} closed, {s['rounds_abandoned']} abandoned"
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
            f"{num(m['accuracy'])}, clients' {num(m['client_accuracy'])}"
            + (f"; promoted: {s['promoted_version']}" if s["promoted_version"] is not None else "")
        )
    if s.get("privacy"):
        out.print(
            f"privacy:     {describe_spending(s['privacy'], s['privacy'].get('budget') or 0.0)}"
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
    if s.get("buffered"):
        _buffered_status(s["buffered"], out)
    return None


def _buffered_status(b: dict[str, Any], out: Console) -> None:
    """Buffered mode's lines of ``sfl status`` (docs/buffered.md)."""
    filling = b["filling"]
    out.print(
        f"buffered:    version {b['version']} ({b['versions_made']} made"
        + (f", {b['versions_per_hour']:.1f} per hour" if b["versions_per_hour"] else "")
        + "); "
        + (
            f"buffer {filling['buffer']} holds {filling['count']}/{filling['size']}"
            if filling
            else "no buffer filling"
        )
        + (f"; stepping buffer(s) {b['stepping']}" if b["stepping"] else "")
    )
    out.print(
        f"training:    {b['training']}/{b['concurrency']} devices now; tickets "
        f"{b['tickets_issued']} issued, {b['accepted']} accepted, {b['rejected']} rejected, "
        f"{b['declined']} declined, {b['expired']} expired"
    )
    if b["staleness"]:
        spread = ", ".join(f"{tau}: {n}" for tau, n in b["staleness"].items())
        out.print(f"staleness:   versions behind -> updates, newest buffers: {spread}")


def _rounds_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title=None, show_lines=False)
    for column, justify in (
        ("round", "right"), ("status", "left"), ("model", "right"), ("cfg", "right"),
        ("answered", "right"), ("accepted", "right"), ("rejected", "left"),
        ("declined", "left"), ("started UTC", "left"), ("time s", "right"), ("accuracy", "right"),
        ("client acc", "right"),
    ):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    private = any(r.get("epsilon") is not None for r in rows)
    if private:
        table.add_column("epsilon", justify="right")
    for r in rows:
        rejected = ", ".join(f"{k} {v}" for k, v in r["rejections"].items()) or "-"
        declined = ", ".join(f"{k} {v}" for k, v in r["declines"].items()) or "-"
        model = f"{r['base_version']}->{r['model_version']}" if r["model_version"] else "-"
        status = r["status"] if r["status"] != "ABANDONED" else f"[red]{r['status']}[/]"
        table.add_row(
            str(r["round"]), status, model, str(r["config_version"]),
            f"{r['answered']}/{r['selected']}", str(r["accepted"]), rejected, declined,
            when(r["started_at"]), f"{r['duration_seconds']:.1f}", num(r["accuracy"]),
            num(r["client_accuracy"]),
            *([num(r.get("epsilon"), ".3g")] if private else []),
        )  # fmt: skip
    return table


def _rounds(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops import views

    if fed.deployed_config.mode == "buffered":
        return _versions(fed, args, out)
    count = None if args.all else (args.last or DEFAULT_LAST)
    rows = [views.round_row(r) for r in views.recent_rounds(fed, count)]
    if args.json:
        return rows
    if not rows:
        out.print("no rounds yet")
        return None
    out.print(_rounds_table(rows))
    return None


def _versions(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    """``sfl rounds`` in buffered mode: the newest buffers and the versions they made."""
    from sfl.ops.buffered_view import recent_versions

    rows = recent_versions(fed, 10**6 if args.all else (args.last or DEFAULT_LAST))
    if args.json:
        return rows
    if not rows:
        out.print("no buffers yet")
        return None
    from rich.table import Table

    table = Table(title=None, show_lines=False)
    for column in (
        "buffer",
        "status",
        "model",
        "updates",
        "staleness",
        "started UTC",
        "client acc",
    ):
        table.add_column(column)
    for r in rows:
        model = f"{r['base_version']}->{r['model_version']}" if r["model_version"] else "-"
        stale = (
            "-"
            if r["staleness_mean"] is None
            else f"{r['staleness_mean']:.1f} (max {r['staleness_max']})"
        )
        table.add_row(
            str(r["buffer"]), r["status"], model, f"{r['count']}/{r['size']}", stale,
            when(r["started_at"]), num(r["client_accuracy"]),
        )  # fmt: skip
    out.print(table)
    return None


def _devices(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops import greengrass, views

    rows = views.devices(fed)
    if args.device:
        rows = [d for d in rows if d["client_id"] in set(args.device)]
    states = greengrass.component_states(
        fed, [d["client_id"] for d in rows], read=not args.no_greengrass
    )
    for d in rows:
        d["greengrass"] = states[d["client_id"]].to_dict()
    if args.json:
        return rows
    if not rows:
        out.print("no such device" if args.device else "no devices yet")
        return None
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("device", no_wrap=True)
    for column in ("active", "last seen", "turnaround s", "picked", "answered", "missed",
                   "rejected", "declined"):  # fmt: skip
        table.add_column(column)
    table.add_column("greengrass", no_wrap=True)  # the component's version and state
    table.add_column("since")
    table.add_column("last error", max_width=LAST_ERROR_WIDTH)
    now = time.time()
    for d in rows:
        table.add_row(
            d["client_id"],
            "yes" if d["active"] else "[red]no[/]",
            _ago(d["last_seen_seconds_ago"]),
            num(d["ewma_turnaround"], ".1f"),
            str(d["rounds_picked"]),
            str(d["rounds_answered"]),
            str(d["rounds_missed"]),
            ", ".join(f"{k} {v}" for k, v in d["rejected"].items()) or "-",
            ", ".join(f"{k} {v}" for k, v in d["declined"].items()) or "-",
            *_greengrass_cells(states[d["client_id"]], now),
        )
    out.print(table)
    unread = [s.reason for s in states.values() if s.reading is greengrass.Reading.NOT_READ]
    if unread and not args.no_greengrass:
        said = f"greengrass: not read for {len(unread)} of {len(rows)} devices, {unread[0] or ''}"
        out.print(Text(said))
    return None


#: What the ``last error`` cell holds of Greengrass's words (``--json`` has all it read),
#: wrapped to at most this width.
LAST_ERROR_CHARS = 80
LAST_ERROR_WIDTH = 40


def _greengrass_cells(state: greengrass.ComponentState, now: float) -> tuple[Text, str, Text]:
    """The columns greengrass (the component's version and state, or why there is none),
    since (its last state change) and last error: AWS's words as plain text (never read as
    markup, so they show as they came) and cut."""
    from rich.text import Text

    from sfl.ops import greengrass

    if state.reading is greengrass.Reading.UNKNOWN:
        return Text("unknown", style="yellow"), "-", _cut(state.reason)
    if state.reading is not greengrass.Reading.REPORTED:  # local, none, not read
        return Text(state.reading.value), "-", Text("-")
    if state.component_version is None:
        cell = Text("not installed")
    else:
        failed = state.lifecycle_state in ("ERRORED", "BROKEN")
        cell = Text(
            f"{state.component_version} {state.lifecycle_state or '-'}",
            style="red" if failed else "",
        )
        if state.component_current is False:
            cell.append(" (old)")
    if state.core_status == "UNHEALTHY" and state.lifecycle_state not in ("ERRORED", "BROKEN"):
        cell.append(", ")
        cell.append("core UNHEALTHY", style="red")  # another component on the device failed
    changed = state.state_changed_at
    since = "-" if changed is None else _ago(max(0.0, now - changed))
    error = ", ".join(state.status_codes)
    if state.lifecycle_details:
        error = f"{error}: {state.lifecycle_details}" if error else state.lifecycle_details
    return cell, since, _cut(error)


def _cut(text: str | None) -> Text:
    from rich.text import Text

    if not text:
        return Text("-")
    return Text(text if len(text) <= LAST_ERROR_CHARS else text[: LAST_ERROR_CHARS - 1] + "…")


def _watch(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    """Live progress of the open round and accuracy per round, until ``--until-round`` has
    finished, ``--timeout`` passes or Ctrl-C."""
    from sfl.ops import views
    from sfl.ops.federation import OpsError

    deadline = time.time() + args.timeout if args.timeout else None
    shown: set[int] = set()
    # A line of JSON per finished round, or a live bar per open round (rich).
    progress = None if args.json else _progress(out)
    task_ids: dict[int, Any] = {}
    # What came before: the newest --history finished rounds are shown, older ones never read.
    window = args.history + 2
    history = views.recent_rounds(fed, window)  # two reads by key a look
    finished = [r.round for r in history if r.status.finished]
    shown.update(finished[: -args.history] if args.history else finished)
    with progress if progress is not None else contextlib.nullcontext():
        while True:
            now = time.time()
            for r in history:
                row = views.round_row(r, now)
                if r.status.finished and r.round not in shown:
                    shown.add(r.round)
                    if progress is None:
                        print(json.dumps(row, default=str, sort_keys=True), flush=True)
                        continue
                    if r.round in task_ids:
                        progress.remove_task(task_ids.pop(r.round))
                    progress.console.print(
                        f"round {r.round} {row['status']}: {row['accepted']}/{row['selected']}"
                        f" accepted, {row['duration_seconds']:.1f} s, accuracy "
                        f"{num(row['accuracy'])} (clients {num(row['client_accuracy'])})"
                        + (f", {row['abandon_reason']}" if row["abandon_reason"] else "")
                    )
                elif not r.status.finished and progress is not None:
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
            history = views.recent_rounds(fed, window)


def _progress(out: Console) -> Progress:
    """``watch``'s live bars: one per open round, gone once it finishes."""
    from rich.progress import BarColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[deadline]}"), console=out, transient=True,
    )  # fmt: skip


def _report(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops.report import write_report

    result = write_report(fed, args.out)
    if args.json:
        return result
    out.print(f"{result['rounds']} rounds: {result['history']}")
    for chart in result["charts"]:
        out.print(f"  {chart}")
    return None


def add_parser(sub: Any) -> None:
    command(sub, "status", _status, "the federation now: round, devices, model, alarms")
    p = command(sub, "rounds", _rounds, "the newest rounds: outcome, answers, rejections, accuracy")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--last",
        type=whole(1),
        default=DEFAULT_LAST,
        help="the newest N rounds",
    )
    shown.add_argument("--all", action="store_true", help="every round (reads the history)")
    p = command(sub, "watch", _watch, "live progress of the open round and accuracy per round")
    p.add_argument(
        "--until-round", type=whole(1), default=0, help="stop once round N has finished (0: never)"
    )
    p.add_argument(
        "--timeout", type=number(0), default=0.0, help="give up after S seconds (0: never)"
    )
    p.add_argument("--interval", type=number(0.1), default=1.0, help="seconds between looks")
    p.add_argument(
        "--history", type=whole(0), default=5, help="also show the last N finished rounds"
    )
    p = command(
        sub,
        "devices",
        _devices,
        "every device: active, last seen, turnaround, answers, rejections, Greengrass state",
    )
    p.add_argument(
        "--device", action="append", default=[], help="only this device (its client id); repeat"
    )
    p.add_argument(
        "--no-greengrass",
        action="store_true",
        help="do not ask Greengrass for the component's state (no greengrass:* calls)",
    )
    p = command(
        sub, "report", _report, "history.json and charts (accuracy, time, cost) into a folder"
    )
    p.add_argument(
        "--out", type=output_path, required=True, help="the folder to write (made if absent)"
    )
    p = command(
        sub, "logs", _logs, "the functions' log lines about a round or a device (CloudWatch Logs)"
    )
    p.add_argument("--round", type=whole(1), default=None, help="lines about round N")
    p.add_argument("--device", default=None, help="lines about this device (its client id)")
    p.add_argument("--since", type=number(0, above=True), default=24.0, help="hours back")
    p.add_argument("--limit", type=whole(1), default=200, help="at most N lines")


def _logs(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops.logs import read_logs

    lines = read_logs(
        fed,
        round_=args.round,
        client=args.device,
        since_seconds=args.since * 3600,
        limit=args.limit,
    )
    if args.json:
        return lines
    if not lines:
        out.print("no log lines match")
    for line in lines:
        extra = {
            k: v
            for k, v in line.items()
            if k in ("round", "client_id", "reason", "detail", "error", "key")
        }
        fields = " ".join(f"{k}={v}" for k, v in extra.items())
        out.print(
            f"{line.get('timestamp', '-')} {line.get('level', '-'):7} "
            f"{line.get('service', '-')}: {line.get('message', '')} {fields}",
            markup=False,
            highlight=False,
        )
    return None
