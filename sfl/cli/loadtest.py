"""``sfl loadtest``: one round with N virtual clients (precomputed updates, no training)
through the local deployment; per-phase timings as JSON (docs/loadtest.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sfl.cli.config import add_set_flag, config_pairs
from sfl.core import plugins


def _loadtest(args: argparse.Namespace) -> int:
    from sfl.local.loadtest import LoadTestError, LoadTestOptions, run_loadtest

    options = LoadTestOptions(
        out=args.out,
        clients=args.clients,
        task=args.task,
        payloads=args.payloads,
        workers=args.workers,
        averager_concurrency=args.averager_concurrency,
        seed=args.seed,
        deadline_seconds=args.deadline,
        config_overrides=config_pairs(args.set),
    )
    print(
        f"sfl loadtest: one round, {options.clients} virtual clients, task {options.task}, "
        f"{options.workers} upload threads, local AWS endpoint (moto) on 127.0.0.1",
        flush=True,
    )
    try:
        result = run_loadtest(options, progress=lambda line: print(f"  {line}", flush=True))
    except LoadTestError as e:
        print(f"sfl loadtest: {e}", file=sys.stderr)
        return 1
    r = result.report
    for phase, seconds in r["phases"].items():
        print(f"  {phase:<14} {'-' if seconds is None else f'{seconds:.2f} s'}")
    print(
        f"round {r['round']} {r['status']}: {r['participants']} of {r['selected']} selected "
        f"aggregated into version {r['model_version']}; {r['averager_invocations']} averager "
        f"invocations; round item {r['round_item_bytes']:,} bytes; peak RSS "
        f"{r['peak_rss_bytes'] / 2**20:.0f} MiB; report: {result.path}",
        flush=True,
    )
    return 0 if r["status"] == "CLOSED" else 1


def add_parser(sub: Any) -> None:
    load = sub.add_parser(
        "loadtest",
        help="one round with N virtual clients (precomputed updates, no training) through "
        "the local deployment; per-phase timings as JSON",
    )
    load.add_argument("--clients", type=int, default=1000, help="virtual clients, all selected")
    load.add_argument(
        "--task",
        default="digits_mlp",
        help=f"the model's task: one of {plugins.allowed('task')}; "
        "sfl.local.loadtest:WideDigitsTask is a 25 MB model",
    )
    load.add_argument("--payloads", type=int, default=8, help="distinct precomputed updates")
    load.add_argument("--workers", type=int, default=16, help="concurrent virtual clients")
    load.add_argument(
        "--averager-concurrency",
        type=int,
        default=4,
        help="averager invocations handling upload events at once",
    )
    load.add_argument("--deadline", type=int, default=900, help="the round's deadline, seconds")
    load.add_argument("--seed", type=int, default=0, help="seeds the model and the updates")
    add_set_flag(load)
    load.add_argument(
        "--out", type=Path, default=Path("runs/loadtest.json"), help="the timings' JSON file"
    )
    load.set_defaults(func=_loadtest)
