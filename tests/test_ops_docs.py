"""docs/operate.md is where an operator looks: every command it walks through, and the IAM
permissions of each."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sfl.cli.main import build_parser

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "operate.md"
NOT_OPERATIONS = {
    "simulate",
    "split-dataset",
    "dataset",  # generates data to simulate with
    "initial-model",
    "task",  # checks a task on this machine, touches no stack
    "new",  # writes a new app folder on this machine, touches no stack
    "recipes",
    "local",
    "cost",
    "loadtest",  # a local load test: it runs its own emulator, never a deployed stack
}


def commands() -> set[str]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices) - NOT_OPERATIONS


def test_the_guide_walks_through_every_operator_command():
    guide = GUIDE.read_text()
    shown = set(re.findall(r"^\$ sfl ([a-z-]+)", guide, flags=re.MULTILINE))
    assert commands() <= shown | {"config"} and "config" in shown
    assert "$ .venv/bin/sfl local up" in guide


def test_the_guide_names_the_permissions_of_every_command():
    table = GUIDE.read_text().split("## IAM permissions each command needs", 1)[1]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = {m for cell in first_cells for m in re.findall(r"`([a-z-]+)[ `]", cell)}
    assert commands() <= named
