"""What the operator's commands share: the flags that find a federation, connecting to it,
output as a rich view or JSON, and a failure as one line on stderr.

Each command finds the federation (``sfl.ops.federation.connect``); a failure to connect is
one clear line and exit code 1, a bad configuration value exit code 2. Registering a command
imports neither boto3 nor rich: they load when a command runs (rich only to print a view).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from sfl.cli.errors import FAILED, INTERRUPTED, USAGE, fail
from sfl.ops.defaults import DEFAULT_STACK, STACK_ENV

if TYPE_CHECKING:
    from rich.console import Console

    from sfl.ops.federation import Federation

#: A command's body: returns JSON-able data to print, or None when it printed its own view.
Handler = Callable[["Federation", argparse.Namespace, "Console"], Any]


def console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 120)


class FirstUse:
    """With ``--json``: stands for the console until a command prints through it, then
    makes it (``console()``), so that a command printing JSON never loads rich."""

    def __init__(self) -> None:
        self._made: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._made is None:
            self._made = console()
        return getattr(self._made, name)


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%m-%d %H:%M:%S")


def num(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


class NothingDone(Exception):
    """The command ran but did nothing of what was asked (no round started, no rollback to
    cancel): ``message`` on stderr, ``data`` (if any) printed as a result, exit code 1."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Connect, run one command, print; a failure is one line on stderr and exit code 1
    (2 for a configuration mistake)."""
    from sfl.core.config import ConfigError
    from sfl.ops.federation import OpsError, connect, translated

    out = cast("Console", FirstUse()) if getattr(args, "json", False) else console()
    try:
        with translated("aws", args.command, args.endpoint):
            fed = connect(
                args.stack, endpoint_url=args.endpoint, region=args.region, profile=args.profile
            )
            data = handler(fed, args, out)
    except (OpsError, ConfigError) as e:
        code = USAGE if isinstance(e, ConfigError) else FAILED
        return fail(args.command, str(e), code, as_json=bool(getattr(args, "json", False)))
    except NothingDone as e:
        if e.data is not None:
            print(json.dumps(e.data, indent=2, default=str, sort_keys=True))
        return fail(args.command, str(e), FAILED, as_json=bool(getattr(args, "json", False)))
    except KeyboardInterrupt:
        return INTERRUPTED
    if data is not None:
        print(json.dumps(data, indent=2, default=str, sort_keys=True))
    return 0


def connection_flags(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """``--stack --endpoint --region --profile`` (and ``--json``): where the federation is."""
    p.add_argument("--stack", help=f"stack name (default: ${STACK_ENV}, else {DEFAULT_STACK})")
    p.add_argument("--endpoint", help="local mode: the endpoint 'sfl local up' printed")
    p.add_argument("--region", help="AWS region (default: your AWS settings)")
    p.add_argument("--profile", help="AWS profile (default: your AWS settings)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def command(
    sub: Any, name: str, handler: Handler, help: str, *, flags: bool = True
) -> argparse.ArgumentParser:
    """Register an operator command that runs ``handler`` against the federation."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    if flags:
        connection_flags(p)
    p.set_defaults(func=lambda args: run(handler, args))
    return p
