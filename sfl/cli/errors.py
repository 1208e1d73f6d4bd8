"""How a command fails: one line on stderr (a JSON object with ``--json``) and an exit code
that means the same in every command: 0 done, 1 failed (or did nothing of what was asked),
2 a usage or configuration mistake, 130 interrupted."""

from __future__ import annotations

import json
import os
import sys

DONE, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
# Set to see a traceback instead of one line for an error sfl did not expect.
DEBUG_ENV = "SFL_DEBUG"


def fail(command: str, message: str, code: int, *, as_json: bool = False) -> int:
    """Print a failure the way every command does; returns ``code``."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    if as_json:
        print(json.dumps({"error": line, "command": command, "exit_code": code}), file=sys.stderr)
    else:
        print(f"sfl {command}: {line}", file=sys.stderr)
    return code


def silence_stdout() -> None:
    """The reader of our output went away (``sfl ... | head``): send the rest nowhere, so
    the interpreter's last flush does not print a traceback either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file descriptor (tests capture stdout)
        pass


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
