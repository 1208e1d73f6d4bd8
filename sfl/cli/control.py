"""The operator's actions on a running federation: ``sfl pause``, ``resume``,
``start-round`` and ``eval-data upload`` (the held-out set the averager scores models on)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from sfl.cli.args import existing_file
from sfl.cli.operator import NothingDone, command

if TYPE_CHECKING:
    from rich.console import Console

    from sfl.ops.federation import Federation


def _pause(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops import actions

    result = actions.pause(fed, args.reason)
    if args.json:
        return result
    out.print("paused: no new rounds start; an open round finishes ('sfl resume' to go on)")
    return None


def _resume(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops import actions

    result = actions.resume(fed)
    if args.json:
        return result
    out.print("resumed: the next scheduled tick (or 'sfl start-round') starts a round")
    return None


def _start_round(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops import actions

    result = actions.start_round(fed)
    if not result.get("started"):
        raise NothingDone(
            f"no round started: {result.get('reason')} (initiator ran {result['ran']})",
            result if args.json else None,
        )
    if args.json:
        return result
    out.print(
        f"round {result['round']} started with {len(result['selected'])} client(s): "
        f"{', '.join(result['selected'])} (initiator ran {result['ran']})"
    )
    return None


def _eval_data(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops import actions

    result = actions.eval_upload(fed, task=args.task, path=args.file)
    if args.json:
        return result
    out.print(
        f"uploaded {result['examples']} held-out examples to {result['key']}; the averager "
        "scores each new model on them"
    )
    return None


def add_parser(sub: Any) -> None:
    p = command(sub, "pause", _pause, "start no new rounds (an open round finishes)")
    p.add_argument("--reason", default="", help="shown by 'sfl status'")
    command(sub, "resume", _resume, "start rounds again")
    command(sub, "start-round", _start_round, "run the initiator now instead of waiting")
    p = command(
        sub, "eval-data", _eval_data, "upload the held-out set the averager scores models on"
    )
    p.add_argument("action", choices=("upload",), help="upload: replace the held-out set")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--task", help="the task's own test split (default: the deployed task)")
    source.add_argument(
        "--file", type=existing_file, help="a safetensors file of x [N, ...] and y [N]"
    )
