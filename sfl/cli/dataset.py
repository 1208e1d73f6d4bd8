"""``sfl split-dataset``: per-client data files for devices, split as ``sfl simulate`` splits."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfl.core import plugins


def partition_flags(p: argparse.ArgumentParser) -> None:
    """How a task's data is split over clients (shared with ``sfl simulate``)."""
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--partition", default="dirichlet", choices=("iid", "dirichlet", "shards"))
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument(
        "--labels-per-client", type=int, default=2, help="labels per client for 'shards'"
    )


def _split_dataset(args: argparse.Namespace) -> int:
    from sfl.learning.splits import write_client_splits
    from sfl.learning.tasks import load_task

    summaries = write_client_splits(
        load_task(args.task),
        args.out,
        args.clients,
        args.partition,
        args.seed,
        alpha=args.alpha,
        labels_per_client=args.labels_per_client,
        eval_fraction=args.eval_fraction,
    )
    for s in summaries:
        print(f"{s.client_id}: {s.num_train} train, {s.num_eval} eval -> {args.out / s.client_id}")
    return 0


def add_parser(sub: Any) -> None:
    split = sub.add_parser("split-dataset", help="write per-client data files for devices")
    split.add_argument("--task", default="digits", help=f"one of {plugins.allowed('task')}")
    partition_flags(split)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--eval-fraction", type=float, default=0.2)
    split.add_argument("--out", type=Path, required=True)
    split.set_defaults(func=_split_dataset)
