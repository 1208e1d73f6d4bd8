"""``sfl simulate``: the whole system on this machine against moto's server, with optional
fault injection and hostile devices.

Configuration keys go through ``--set KEY=VALUE``. A few keys also shape the simulation
itself (its data split, its random draws, how long it waits for a round) and keep a flag
people type daily, an alias of ``--set``: ``--task``, ``--seed``, ``--soft-deadline`` and
``--deadline``; ``--task-params`` is one too. A ``--set`` of the same key wins over its alias.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sfl.cli.args import existing_file, number, output_path, share, whole
from sfl.cli.config import add_set_flag, config_pairs
from sfl.cli.dataset import partition_flags
from sfl.core import plugins
from sfl.local.attacks import ATTACKS

#: The configuration keys that also shape the simulation -> the ``SimulationOptions`` field
#: each sets; the simulation builds the rest of its configuration from them.
SHAPING_KEYS = {
    "task": "task",
    "task_params": "task_params",
    "seed": "seed",
    "round_soft_deadline_seconds": "soft_deadline_seconds",
    "round_deadline_seconds": "round_timeout_seconds",
}
#: The flags kept beside ``--set``: flag -> the key it sets.
ALIASES = {
    "--task": "task",
    "--task-params": "task_params",
    "--seed": "seed",
    "--soft-deadline": "round_soft_deadline_seconds",
    "--deadline": "round_deadline_seconds",
}


#: Keys of an app's cdk.json that a simulation does not take: they time real devices'
#: rounds (minutes); a simulation keeps its own seconds unless the command line sets them.
DEVICE_TIMING_KEYS = frozenset({"round_soft_deadline_seconds", "round_deadline_seconds"})


def config_keys(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """Every configuration key the run sets: key -> (text, where it was set); the app's
    cdk.json first, then the aliases, so a ``--set`` of the same key wins."""
    from sfl.cli.app import federation_keys
    from sfl.core.config import FederationConfig

    given = federation_keys(args.app, skip=DEVICE_TIMING_KEYS)
    given.update(
        {
            key: (value, flag)
            for flag, key in ALIASES.items()
            if (value := getattr(args, flag[2:].replace("-", "_"))) is not None
        }
    )
    given.update({key: (value, "--set") for key, value in config_pairs(args.set)})
    FederationConfig.refuse_unknown(
        {k: v for k, v in given.items() if v[1] != "--set"}, source=str(args.app / "cdk.json")
    )
    FederationConfig.refuse_unknown(
        {k: v for k, v in given.items() if v[1] == "--set"}, source="--set"
    )
    return given


def _simulate(args: argparse.Namespace) -> int:
    from sfl.core.config import FederationConfig
    from sfl.learning.tasks import configured_task
    from sfl.local.simulate import SimulationError, SimulationOptions, run_simulation

    given = config_keys(args)
    shaping = {
        SHAPING_KEYS[key]: FederationConfig.parse_value(key, text, where=flag)
        for key, (text, flag) in given.items()
        if key in SHAPING_KEYS
    }
    options = SimulationOptions(
        out=args.out,
        clients=args.clients,
        rounds=args.rounds,
        partition=args.partition,
        alpha=args.alpha,
        labels_per_client=args.labels_per_client,
        duplicate_deliveries=args.duplicate_deliveries,
        drop_events=args.drop_events,
        crash_rate=args.crash_rate,
        straggler_rate=args.straggler_rate,
        slow_clients=args.slow_clients,
        averager_crash=args.averager_crash,
        attackers=args.attackers,
        attack=args.attack,
        init_from=args.init_from,
        config_overrides=tuple(
            (k, text) for k, (text, _) in given.items() if k not in SHAPING_KEYS
        ),
        **shaping,
    )
    if options.attackers > options.clients:
        raise ValueError(
            f"--attackers {options.attackers} is more than --clients {options.clients}"
        )
    # Checked before anything prints or starts: a bad key, value or task is one line.
    configured_task(options.federation_config())
    print(
        f"sfl simulate: {options.clients} clients, {options.rounds} rounds, task {options.task}, "
        f"{options.partition} partition, local AWS endpoint (moto) on 127.0.0.1",
        flush=True,
    )
    print(
        f"{'round':>5} {'status':>9} {'clients':>8} {'accuracy':>9} {'loss':>7} "
        f"{'client acc':>10} {'time s':>7} {'overhead s':>10}",
        flush=True,
    )

    live = sys.stdout.isatty()
    clear = "\r\033[K" if live else ""  # the status line gives way to the round's row

    def status(text: str) -> None:
        # On a terminal, one line that changes in place; in a log, the set-up steps only.
        if live:
            print(f"\r\033[K  ... {text}", end="", flush=True)
        elif not text.startswith("round "):
            print(f"  ... {text}", flush=True)

    def show(row: dict[str, Any]) -> None:
        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        if "buffer" in row:  # buffered mode: a version, and the updates its buffer took
            clients = f"{row['participants']}"
        else:
            clients = f"{len(row['accepted'])}/{len(row['selected'])}"
        print(
            f"{clear}{row['round']:>5} {row['status']:>9} {clients:>8} "
            f"{fmt(row['accuracy'], '.4f'):>9} "
            f"{fmt(row['loss'], '.4f'):>7} {fmt(row['client_accuracy'], '.4f'):>10} "
            f"{fmt(row['timings']['total'], '.2f'):>7} {fmt(row['overhead_seconds'], '.2f'):>10}",
            flush=True,
        )

    try:
        result = run_simulation(options, progress=show, activity=status)
    except SimulationError as e:
        print(f"sfl simulate: {e}", file=sys.stderr)
        return 1
    print(
        f"initial accuracy {result.initial_accuracy:.4f} -> final {result.final_accuracy or 0:.4f} "
        f"in {result.wall_seconds:.1f} s; history: {result.history_path}; plot: {result.plot_path}",
        flush=True,
    )
    return 0


def add_parser(sub: Any) -> None:
    sim = sub.add_parser("simulate", help="run the whole system locally against moto's server")
    partition_flags(sim)
    sim.add_argument("--rounds", type=whole(1), default=15, help="rounds to run")
    keys = sim.add_argument_group(
        "configuration",
        "any key of 'sfl config' through --set KEY=VALUE, e.g. --set lr=0.1 --set "
        "selection=utility; plug-ins by name: "
        + "; ".join(
            f"{kind} {', '.join(plugins.names(kind))}"
            for kind in ("selection", "aggregation", "quorum")
        )
        + ". Five keys keep a flag of their own.",
    )
    add_set_flag(keys)
    keys.add_argument(
        "--task", help=f"--set task=T (default: digits): one of {plugins.allowed('task')}"
    )
    keys.add_argument(
        "--task-params",
        metavar="JSON",
        help='--set task_params=JSON: the task\'s parameters, e.g. \'{"root": "images", '
        '"num_classes": 10}\' for image_folder (docs/tasks.md)',
    )
    keys.add_argument("--seed", help="--set seed=N (default: 0): also the data split and faults")
    keys.add_argument(
        "--soft-deadline",
        metavar="SECONDS",
        help="--set round_soft_deadline_seconds=S (default: 60): the quorum relaxes",
    )
    keys.add_argument(
        "--deadline",
        metavar="SECONDS",
        help="--set round_deadline_seconds=S (default: 120): the hard deadline",
    )
    faults = sim.add_argument_group("fault injection")
    faults.add_argument(
        "--duplicate-deliveries", type=whole(0), default=0, help="extra copies of each S3 event"
    )
    faults.add_argument("--drop-events", type=share, default=0.0, help="share of S3 events lost")
    faults.add_argument(
        "--crash-rate", type=share, default=0.0, help="chance a picked client dies mid-round"
    )
    faults.add_argument(
        "--straggler-rate",
        type=share,
        default=0.0,
        help="chance a client answers after the deadline",
    )
    faults.add_argument(
        "--slow-clients",
        type=number(0),
        default=0.0,
        metavar="SIGMA",
        help="heterogeneous speeds: per-client log-normal slowdown with this sigma",
    )
    faults.add_argument(
        "--averager-crash", action="store_true", help="the averager dies mid-aggregation once"
    )
    hostile = sim.add_argument_group("hostile devices")
    hostile.add_argument(
        "--attackers", type=whole(0), default=0, help="how many clients are hostile (the first K)"
    )
    hostile.add_argument(
        "--attack", default="scale", choices=ATTACKS, help="what the hostile clients send"
    )
    sim.add_argument(
        "--out",
        type=output_path,
        default=Path("runs/latest"),
        help="the folder for its history, plot and logs",
    )
    sim.add_argument(
        "--init-from",
        type=existing_file,
        metavar="FILE",
        help="start from your own weights: a safetensors file or a state dict (read with "
        "torch.load(weights_only=True)), checked against the task's model; becomes version 0",
    )
    sim.add_argument(
        "--app",
        type=Path,
        default=Path("."),
        help="an app's folder: its cdk.json's 'sfl' context is the base "
        "configuration (not its device deadlines) and its packages import",
    )
    sim.set_defaults(func=_simulate)
