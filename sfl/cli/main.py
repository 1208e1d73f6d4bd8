"""The ``sfl`` command: local simulation, dataset splitting, configuration reference, the
operator's commands on a running federation, recipes and cost.

One tree: this module builds the root parser and dispatches; each command group is a module
of :mod:`sfl.cli` with an ``add_parser(subparsers)``. Configuration keys are set with
``--set KEY=VALUE`` (:mod:`sfl.cli.config`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sfl.cli import (
    config,
    control,
    cost,
    dataset,
    initial_model,
    loadtest,
    local,
    models,
    new,
    recipes,
    simulate,
    status,
    task,
)

#: The command groups, in the order ``sfl --help`` lists them.
GROUPS = (
    new,
    simulate,
    task,
    loadtest,
    dataset,
    config,
    status,
    models,
    control,
    local,
    initial_model,
    recipes,
    cost,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:  # ConfigError, PartitionError, TaskError, ...: a clear message
        print(f"sfl {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
