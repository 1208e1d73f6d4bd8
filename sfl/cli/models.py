"""``sfl models list | pull | promote | rollback | init``: the federation's model versions.

``init --from FILE`` starts a federation from the user's own weights: the file (safetensors,
or a state dict read with ``torch.load(weights_only=True)``) is checked against the deployed
task's model and written as version 0, before any round, its lineage naming the file and
its SHA-256. The same boto3 calls reach AWS and the local endpoint (``--endpoint``). What
reads and writes the versions is imported when a command runs, not to build the parser.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfl.cli.args import output_path, whole
from sfl.cli.operator import NothingDone, command, connection_flags, num, when
from sfl.ops.defaults import DEFAULT_LAST

if TYPE_CHECKING:
    from rich.console import Console

    from sfl.ops.federation import Federation


def _start_from(fed: Federation, path: Path, *, replace: bool) -> dict[str, Any]:
    """The user's weights in ``path`` become model version 0, if no round has started."""
    from sfl.learning.tasks import load_task
    from sfl.learning.weights import WeightsError, read_weights
    from sfl.ops.federation import OpsError
    from sfl.state.lineage import LineageStore
    from sfl.state.rounds import RoundStore

    config = fed.deployed_config
    rounds = RoundStore(fed.aws.dynamodb, fed.names.rounds_table)
    started = rounds.latest(config.experiment, slots=False)
    if started is not None:
        raise OpsError(
            f"round {started.round} of experiment {config.experiment!r} has started already: "
            "a federation starts from your weights before its first round. Deploy another "
            "stack (sfl_infra.stack_prefix) or experiment (sfl.experiment) for them"
        )
    reference = load_task(config.task).build_model(seed=config.seed).state_dict()
    try:
        weights = read_weights(path, reference)
    except WeightsError as e:
        raise OpsError(f"{e}\n(the deployed task is {config.task!r})") from e
    body = weights.model_bytes()
    store = LineageStore(fed.aws, fed.names)
    if not store.start_from(body, source=weights.source(), now=time.time(), replace=replace):
        raise OpsError(
            "model version 0 exists already (the stack writes one from the task's seed when "
            "it is deployed) and no round has started: run again with --replace to start "
            "from your weights instead"
            if not replace
            else "model version 0 changed while it was being replaced: run again"
        )
    late = rounds.latest(config.experiment, slots=False)
    return {
        "version": 0,
        "bytes": len(body),
        "tensors": len(weights.tensors),
        "format": weights.format,
        **weights.source(),
        "warning": None
        if late is None
        else f"round {late.round} started while version 0 was written: its clients may have "
        "trained from the previous version 0",
    }


def _models(fed: Federation, args: argparse.Namespace, out: Console) -> Any:
    from sfl.ops import actions

    if args.models_action == "list":
        from sfl.ops import views

        rows = views.models(fed, None if args.all else args.last)
        if args.json:
            return rows
        from rich.table import Table

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
    if args.models_action == "init":
        result = _start_from(fed, args.source, replace=args.replace)
        message = (
            f"model version 0 is now {result['source_file']} ({result['format']}, "
            f"{result['tensors']} tensors, {result['bytes']} bytes, sha256 "
            f"{result['source_sha256'][:16]}...)"
        )
        if result["warning"]:
            message += f"\nwarning: {result['warning']}"
    elif args.models_action == "pull":
        result = actions.pull(fed, args.version, args.out)
        message = (
            f"wrote model version {result['version']} to {result['path']} ({result['bytes']} bytes)"
        )
    elif args.models_action == "promote":
        result = actions.promote(fed, args.version)
        message = f"version {result['promoted']} promoted: devices read it at {result['key']}"
    elif args.models_action == "rollback" and args.cancel:
        result = actions.cancel_rollback(fed)
        if not result["cancelled"]:
            raise NothingDone(
                "no rollback is pending (none was asked, or the initiator already carried it "
                "out: see 'sfl models list')",
                result if args.json else None,
            )
        message = f"the pending rollback to version {result['rollback_to']} is cancelled"
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
    listing = actions_.add_parser("list", help="the newest versions with their lineage")
    connection_flags(listing)
    count = listing.add_mutually_exclusive_group()
    count.add_argument(
        "--last",
        type=whole(1),
        default=DEFAULT_LAST,
        help="the newest N versions",
    )
    count.add_argument("--all", action="store_true", help="every version (lists the bucket)")
    pull = actions_.add_parser("pull", help="download a version (default: promoted, else newest)")
    pull.add_argument(
        "version", type=whole(0), nargs="?", help="the version (none: promoted, else newest)"
    )
    pull.add_argument("--out", type=output_path, required=True, help="the file to write")
    promote = actions_.add_parser("promote", help="the version devices use for inference")
    promote.add_argument("version", type=whole(0), help="the version to promote")
    rollback = actions_.add_parser("rollback", help="the next round starts from VERSION")
    rollback.add_argument(
        "version", type=whole(0), nargs="?", help="the version (none: the newest's parent)"
    )
    rollback.add_argument("--cancel", action="store_true", help="drop a pending rollback")
    init = actions_.add_parser(
        "init", help="start the federation from your own weights (version 0, before round 1)"
    )
    init.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        metavar="FILE",
        help="safetensors, or a PyTorch state dict (read with torch.load(weights_only=True))",
    )
    init.add_argument(
        "--replace",
        action="store_true",
        help="replace the version 0 the stack wrote from the task's seed (before any round)",
    )
    for action in (pull, promote, rollback, init):
        connection_flags(action)
