"""``sfl new DIR``: write a new app (your task, cdk.json, app.py, a test, a README)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _new(args: argparse.Namespace) -> int:
    from sfl.build.new_app import create_app

    app = create_app(args.directory, package=args.package)
    print(f"created {app.root}: package {app.package}, task {app.task}, stack {app.stack_prefix}")
    for name in app.files:
        print(f"  {name}")
    print("next:")
    print(f"  cd {app.root}")
    print("  sfl simulate        # your task on 10 local clients")
    print("  sfl task check      # your task against the contract")
    print(f"  edit {app.package}/task.py: your model and your data")
    return 0


def add_parser(sub: Any) -> None:
    new = sub.add_parser("new", help="create a new app: your task, its cdk.json, app.py, a test")
    new.add_argument("directory", type=Path, help="the app's folder (absent or empty)")
    new.add_argument(
        "--package", help="the task's Python package (default: from the folder's name)"
    )
    new.set_defaults(func=_new)
