"""``sfl initial-model``: global model version 0 of a task, written to a file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _initial_model(args: argparse.Namespace) -> int:
    from sfl.learning import codec
    from sfl.learning.tasks import load_task

    model = load_task(args.task, args.task_params).build_model(seed=args.seed)
    args.out.write_bytes(codec.encode_model(model.state_dict(), version=0, seed=args.seed))
    print(f"wrote model version 0 of task {args.task} (seed {args.seed}) to {args.out}")
    return 0


def add_parser(sub: Any) -> None:
    init = sub.add_parser("initial-model", help="write global model version 0 to a file")
    init.add_argument("--task", default="digits")
    init.add_argument(
        "--task-params", default="{}", metavar="JSON", help="the task's parameters (a JSON object)"
    )
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", type=Path, required=True)
    init.set_defaults(func=_initial_model)
