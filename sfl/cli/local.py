"""``sfl local up``: a running federation on this machine until Ctrl-C; it prints the
endpoint the operator's commands take (``sfl status --endpoint URL``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfl.cli.args import number, output_path, whole
from sfl.cli.config import add_set_flag, config_pairs
from sfl.ops.defaults import DEFAULT_STACK


def _local_up(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from sfl.local.fleet import FleetOptions, LocalFleet
    from sfl.ops import local_endpoint
    from sfl.state.rounds import RoundStore

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
    print(f"sfl local up: starting {args.clients} clients, task {args.task} ...", flush=True)
    with LocalFleet(options) as fleet:
        env = fleet.client_env()
        if args.env_file:  # for scripts: a shell that sources it reaches only this federation
            exports = "\n".join(f"export {k}={v}" for k, v in sorted(env.items()))
            args.env_file.write_text(exports + "\n")
        local_endpoint.record(
            local_endpoint.LocalEndpoint(
                endpoint_url=fleet.endpoint_url,
                region=env["AWS_REGION"],
                stack=args.stack,
                credentials_uri=env["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
                credentials_token=env["AWS_CONTAINER_AUTHORIZATION_TOKEN"],
                pid=os.getpid(),
                log_path=str((args.out / "lambda-logs.jsonl").resolve()),
            )
        )
        print(f"sfl local up: stack {args.stack} at {fleet.endpoint_url} (Ctrl-C stops it)")
        print(f"from any shell: sfl status --endpoint {fleet.endpoint_url}", flush=True)
        federation = fleet.federation
        rounds = RoundStore(federation.aws.clients().dynamodb, federation.names.rounds_table)
        shown = 0
        try:
            while not stop.wait(0.5):
                shown = _report_finished(rounds, fleet.config.experiment, shown)
        except KeyboardInterrupt:
            pass
        finally:
            local_endpoint.forget(fleet.endpoint_url)
        print("sfl local up: stopping (clients finish the step they are in)", flush=True)
    return 0


# A closed round is reported once scored, or after this long without a score.
SCORE_WAIT_SECONDS = 10.0


def _report_finished(rounds: Any, experiment: str, shown: int) -> int:
    """Print each round that finished since round ``shown``; the last one printed."""
    import time

    latest = rounds.latest(experiment, slots=False)
    while latest is not None and shown < latest.round:
        r = rounds.get(experiment, shown + 1, slots=False)
        if r is None or not r.status.finished:
            break
        waiting = time.time() - (r.finished_at or 0.0) < SCORE_WAIT_SECONDS
        if r.status.value == "CLOSED" and not r.evaluation and waiting:
            break
        accuracy = r.evaluation.get("accuracy")
        scored = "" if accuracy is None else f", accuracy {accuracy:.4f}"
        why = f" ({r.abandon_reason})" if r.abandon_reason else ""
        print(
            f"round {r.round} {r.status.value}{why}: {r.accepted_count}/{r.selected_count} "
            f"accepted{scored}",
            flush=True,
        )
        shown = r.round
    return shown


def add_parser(sub: Any) -> None:
    local = sub.add_parser("local", help="local mode: a running federation on this machine")
    local_sub = local.add_subparsers(dest="local_action", required=True)
    up = local_sub.add_parser("up", help="run the federation until Ctrl-C; prints its endpoint")
    up.add_argument("--clients", type=whole(1), default=4, help="edge clients to run")
    up.add_argument("--task", default="digits", help="the task they train")
    up.add_argument("--seed", type=whole(0), default=0, help="data split and model seed")
    up.add_argument(
        "--stack", default=DEFAULT_STACK, help="the stack name the operator's commands find it by"
    )
    up.add_argument(
        "--schedule-seconds",
        type=number(0, above=True),
        default=2.0,
        help="seconds between the initiator's scheduled runs",
    )
    add_set_flag(up)
    up.add_argument("--env-file", type=output_path, help="also write the shell exports here")
    up.add_argument(
        "--out",
        type=output_path,
        default=Path("runs/local"),
        help="the folder for its data, logs and state",
    )
    up.set_defaults(func=_local_up)
