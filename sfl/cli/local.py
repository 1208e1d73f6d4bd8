"""``sfl local up``: a running federation on this machine until Ctrl-C; it prints the
endpoint the operator's commands take (``sfl status --endpoint URL``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfl.cli.config import add_set_flag, config_pairs
from sfl.ops.federation import DEFAULT_STACK


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
        config_overrides=config_pairs(args.set),
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


def add_parser(sub: Any) -> None:
    local = sub.add_parser("local", help="local mode: a running federation on this machine")
    local_sub = local.add_subparsers(dest="local_action", required=True)
    up = local_sub.add_parser("up", help="run the federation until Ctrl-C; prints its endpoint")
    up.add_argument("--clients", type=int, default=4)
    up.add_argument("--task", default="digits")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--stack", default=DEFAULT_STACK)
    up.add_argument("--schedule-seconds", type=float, default=2.0, help="the initiator's period")
    add_set_flag(up)
    up.add_argument("--env-file", type=Path, help="also write the shell exports here")
    up.add_argument("--out", type=Path, default=Path("runs/local"))
    up.set_defaults(func=_local_up)
