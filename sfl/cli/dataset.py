"""``sfl split-dataset``: per-client data for devices, split as ``sfl simulate`` splits;
``sfl dataset images``: synthetic class folders for the ``image_folder`` task."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sfl.cli.args import number, whole
from sfl.core import plugins


def partition_flags(p: argparse.ArgumentParser) -> None:
    """How a task's data is split over clients (shared with ``sfl simulate``)."""
    p.add_argument("--clients", type=whole(1), default=10, help="how many clients")
    p.add_argument(
        "--partition",
        default="dirichlet",
        choices=("iid", "dirichlet", "shards"),
        help="iid: shuffled evenly; dirichlet: label shares drawn per client (--alpha); "
        "shards: a few labels per client (--labels-per-client)",
    )
    p.add_argument(
        "--alpha", type=number(0, above=True), default=0.5, help="Dirichlet concentration"
    )
    p.add_argument(
        "--labels-per-client", type=whole(1), default=2, help="labels per client for 'shards'"
    )


def _split_dataset(args: argparse.Namespace) -> int:
    from sfl.core.config import FederationConfig
    from sfl.learning.splits import write_client_splits
    from sfl.learning.tasks import configured_task

    config = FederationConfig.from_mapping(
        {"task": args.task, "task_params": args.task_params}, source="command line"
    )
    summaries = write_client_splits(
        configured_task(config),
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


def _images(args: argparse.Namespace) -> int:
    from sfl.local.synthetic_images import write_image_folders

    written = write_image_folders(
        args.out,
        num_classes=args.classes,
        per_class=args.per_class,
        size=args.size,
        seed=args.seed,
    )
    print(
        f"wrote {len(written)} class folders of {args.per_class} {args.size}x{args.size} "
        f"PNG images to {args.out}: {', '.join(c.name for c in written)}"
    )
    return 0


def add_parser(sub: Any) -> None:
    split = sub.add_parser("split-dataset", help="write per-client data for devices")
    split.add_argument("--task", default="digits", help=f"one of {plugins.allowed('task')}")
    split.add_argument(
        "--task-params",
        default="{}",
        metavar="JSON",
        help='the task\'s parameters, e.g. \'{"root": "images", "num_classes": 10}\'',
    )
    partition_flags(split)
    split.add_argument(
        "--seed", type=int, default=0, help="seeds the split (same seed, same split)"
    )
    split.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        help="share of each client's data kept for its local evaluation",
    )
    split.add_argument(
        "--out", type=Path, required=True, help="the folder to write (one folder per client)"
    )
    split.set_defaults(func=_split_dataset)

    dataset = sub.add_parser("dataset", help="generate datasets to simulate with")
    kinds = dataset.add_subparsers(dest="dataset_kind", required=True)
    images = kinds.add_parser(
        "images",
        help="synthetic, learnable class folders of PNG images (a shape and colour per class) "
        "for the image_folder task",
    )
    images.add_argument(
        "--out", type=Path, required=True, help="the folder to write (one folder per class)"
    )
    images.add_argument("--classes", type=int, default=10, help="how many classes")
    images.add_argument("--per-class", type=int, default=50, help="images per class")
    images.add_argument("--size", type=int, default=64, help="pixels, square")
    images.add_argument("--seed", type=int, default=0, help="seeds the images' shapes and noise")
    images.set_defaults(func=_images)
