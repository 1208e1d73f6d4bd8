"""Argument types the commands share. A value out of range, a file that is not there or a
place that cannot be written is argparse's usage error (exit code 2), in the words typed,
before anything starts: never a negative price, a silently shortened list or a directory
made somewhere unexpected."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def whole(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"{text} is not at least {minimum}{upper}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its message
    return parse


def number(minimum: float = 0.0, *, above: bool = False) -> Callable[[str], float]:
    """A finite number at least ``minimum`` (strictly above it if ``above``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            bound = f"above {minimum:g}" if above else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {bound}")
        return value

    parse.__name__ = "number"
    return parse


def existing_file(text: str) -> Path:
    """A file that exists and can be read."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def output_path(text: str) -> Path:
    """Somewhere to write: its folder must exist (nothing is created above it)."""
    path = Path(text).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {parent} does not exist")
    return path


def share(text: str) -> float:
    """A share of something: a number from 0 to 1."""
    value = number(0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share from 0 to 1")
    return value


share.__name__ = "share"
