"""``sfl initial-model``: global model version 0 of a task, written to a file: from the
task's seed, or from the user's own weights (``--from FILE``, checked against the task)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _initial_model(args: argparse.Namespace) -> int:
    from sfl.learning import codec
    from sfl.learning.tasks import load_task
    from sfl.learning.weights import read_weights

    model = load_task(args.task, args.task_params).build_model(seed=args.seed)
    if args.source is not None:
        weights = read_weights(args.source, model.state_dict())  # WeightsError: exit 2
        args.out.write_bytes(weights.model_bytes())
        print(
            f"wrote model version 0 of task {args.task} from {args.source} "
            f"(sha256 {weights.sha256}) to {args.out}"
        )
        return 0
    args.out.write_bytes(codec.encode_model(model.state_dict(), version=0, seed=args.seed))
    print(f"wrote model version 0 of task {args.task} (seed {args.seed}) to {args.out}")
    return 0


def add_parser(sub: Any) -> None:
    init = sub.add_parser("initial-model", help="write global model version 0 to a file")
    init.add_argument("--task", default="digits", help="the task whose model it is")
    init.add_argument(
        "--task-params", default="{}", metavar="JSON", help="the task's parameters (a JSON object)"
    )
    init.add_argument("--seed", type=int, default=0, help="seeds the model's initial weights")
    init.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="FILE",
        help="your own weights (safetensors, or a state dict read with weights_only=True)",
    )
    init.add_argument("--out", type=Path, required=True, help="the file to write")
    init.set_defaults(func=_initial_model)
