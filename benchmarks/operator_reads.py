"""Benchmark: how long the operator's everyday commands take as the history grows.

    .venv/bin/python benchmarks/operator_reads.py   # writes benchmarks/results/operator_reads.json

A local federation (``sfl local up``'s, one client, no schedule), then synthetic history
written straight into its rounds table and models bucket: closed rounds with their slots and
a model version with its lineage each, and the item naming the newest round, as the
initiator leaves them. ``status``, ``rounds``, ``devices``, ``models list`` and one look of
``watch`` are timed at 10 rounds, at 200 (every command's window full) and at 10,000, median
of 5: in this process (the requests and what the command does with them), and as the
operator runs them, each a new ``python -m sfl.cli.main`` process (its start-up too: the
interpreter, the imports, the clients), with its bytecode compiled as an installed ``sfl``'s
is (a first run of each command, not timed). Goal (issue 25): each at most 1 s locally, and
the same at every size once the windows are full.

The federation's watchdog ticks once a minute, as EventBridge ticks a deployed stack's: each
tick queries the rounds table, which the emulator answers by walking every item of it (at
10,000 rounds, half a second of this process's CPU a tick), and local mode's one-second tick
would time that instead of the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sfl.cli.main import main
from sfl.core import layout
from sfl.local.fleet import FleetOptions, LocalFleet
from sfl.state.dynamo import to_item
from sfl.state.lineage import ModelLineage
from sfl.state.rounds import RoundState, RoundStore, storable
from sfl.state.rounds.keys import NEWEST_ATTRIBUTE, newest_key

RESULTS = Path(__file__).parent / "results" / "operator_reads.json"
STACK = "Sfl-ReadsBenchmark"
COMMANDS = {
    "status": ["status", "--json"],
    "rounds": ["rounds", "--json"],
    "devices": ["devices", "--json"],
    "models list": ["models", "list", "--json"],
    "watch (one look)": ["watch", "--json", "--timeout", "0.01", "--history", "5"],
}
REPEATS = 5
#: A history past every command's window (``status`` counts the newest 100 rounds): from
#: 10 rounds to here the windows fill; from here on nothing should grow.
WINDOWS_FULL = 200
#: The watchdog's tick: a deployed stack's (EventBridge, once a minute).
TICK_SECONDS = 60.0
# Rounds with their slot items written (``devices`` reads the newest 20 rounds' slots).
SLOTTED = 50


def write_history(fleet: LocalFleet, first: int, last: int, client: str) -> None:
    """Rounds ``first``..``last`` closed, each with a model version and its lineage; the
    newest ``SLOTTED`` of them also with their slot (what ``devices`` reads)."""
    federation = fleet.federation
    clients = federation.aws.clients()
    table = federation.names.rounds_table
    store = RoundStore(clients.dynamodb, table)
    bucket = federation.names.models_bucket
    template = store.latest(federation.config.experiment, slots=True)
    assert template is not None, "run one real round first"
    batch: list[dict[str, Any]] = []
    for number in range(first, last + 1):
        now = time.time()
        closed = replace(
            template, round=number, base_version=number - 1, model_version=number,
            status=RoundState.CLOSED, created_at=now - 5, finished_at=now, selected=(client,),
            evaluation={"accuracy": 0.9, "loss": 0.3}, selected_count=1, answered_count=1,
            accepted_count=1, rejected_count=0, declined_count=0, answer_rejections={},
            answer_declines={},
        )  # fmt: skip
        # What ``RoundStore.close`` and ``record_evaluation`` add to the item ``to_item`` writes.
        finished = to_item(
            {
                "model_version": number,
                "finished_at": now,
                "summary": storable(template.summary),
                "evaluation": dict(closed.evaluation),
            }
        )
        batch.append({"PutRequest": {"Item": closed.to_item() | finished}})
        if number == last:  # what ``RoundStore.create`` writes with each round
            newest = newest_key(federation.config.experiment)
            batch.append({"PutRequest": {"Item": newest | {NEWEST_ATTRIBUTE: {"N": str(last)}}}})
        if len(batch) >= 24 or number == last:
            while batch:
                response = clients.dynamodb.batch_write_item(RequestItems={table: batch})
                batch = list(response.get("UnprocessedItems", {}).get(table, []))
        if number > last - SLOTTED:
            store.write_slots(closed, (client,))
        clients.s3.put_object(Bucket=bucket, Key=layout.model_key(number), Body=b"synthetic")
        lineage = ModelLineage(version=number, kind="round", parent=number - 1, round=number)
        clients.s3.put_object(
            Bucket=bucket, Key=layout.lineage_key(number), Body=json.dumps(lineage.to_dict())
        )


def time_commands(fleet: LocalFleet) -> dict[str, dict[str, float]]:
    """Each command in this process: what its requests and its work on them take, in
    seconds of wall time and of this process's CPU (the emulator's too: it runs here)."""
    timings: dict[str, dict[str, float]] = {}
    for name, argv in COMMANDS.items():
        wall, cpu = [], []
        for _ in range(REPEATS):
            started, used = time.perf_counter(), time.process_time()
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main([*argv, "--endpoint", fleet.endpoint_url, "--stack", STACK])
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - used)
            # watch's 0.01 s timeout ends it with exit code 1 after one look, by design.
            assert code == 0 or name.startswith("watch"), f"{name}: {err.getvalue()}"
        timings[name] = {"wall": _median(wall), "cpu": _median(cpu)}
    return timings


def time_processes(fleet: LocalFleet) -> dict[str, dict[str, float]]:
    """Each command as the operator runs it: a new process, start-up included (and
    ``sfl --version``: the start-up alone, no request). Wall time, the command's own CPU
    time (its process: start-up, requests, parsing) and this process's (the emulator
    answering, and the federation's own work meanwhile)."""
    env = os.environ | fleet.client_env()
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    # As installed: compiled once (pip compiles an installed package's bytecode), then read.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    timings: dict[str, dict[str, float]] = {}
    for name, argv in {"start-up (--version)": ["--version"], **COMMANDS}.items():
        where = (
            [] if argv == ["--version"] else ["--endpoint", fleet.endpoint_url, "--stack", STACK]
        )
        command = [sys.executable, "-m", "sfl.cli.main", *argv, *where]
        subprocess.run(command, env=env, capture_output=True, check=False)  # compiles, untimed
        wall, cpu, server = [], [], []
        for _ in range(REPEATS):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started, used = time.perf_counter(), time.process_time()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            wall.append(time.perf_counter() - started)
            server.append(time.process_time() - used)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            assert done.returncode == 0 or name.startswith("watch"), f"{name}: {done.stderr}"
        timings[name] = {
            "wall": _median(wall),
            "cpu": _median(cpu),
            "emulator_cpu": _median(server),
        }
    return timings


def _median(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def run(rounds: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as out,
        LocalFleet(
            FleetOptions(
                out=Path(out),
                clients=1,
                schedule_seconds=3600.0,
                tick_seconds=TICK_SECONDS,
                stack=STACK,
            )
        ) as fleet,
    ):
        started = fleet.federation.start_round()
        assert started["started"], started
        fleet.federation.wait_for_round(1, timeout=120)
        client = started["selected"][0]
        timings: dict[str, Any] = {}
        written = 1
        for size in (10, WINDOWS_FULL, rounds):
            if size <= written:
                continue
            started_at = time.perf_counter()
            write_history(fleet, written + 1, size, client)
            if size == rounds:
                timings["fill_seconds"] = round(time.perf_counter() - started_at)
            written = size
            timings[f"at_{size}_rounds"] = {
                "in_process": time_commands(fleet),
                "new_process": time_processes(fleet),
            }
    return timings


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--note", default="", help="what the figures need said (the machine's load)"
    )
    args = parser.parse_args()
    result = {
        "measured": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "seconds_median_of": REPEATS,
        "load_average_1_5_15_min_before": [round(x, 1) for x in os.getloadavg()],
        **run(args.rounds),
        # Other work on the machine slows every figure: the load when they were taken.
        "load_average_1_5_15_min": [round(x, 1) for x in os.getloadavg()],
    }
    if args.note:
        result["note"] = args.note
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main_()
