"""The ``sfl`` command: local simulation, dataset splitting, configuration reference, the
operator's commands on a running federation, recipes and cost.

One tree: this module builds the root parser and dispatches; each command group is a module
of :mod:`sfl.cli` with an ``add_parser(subparsers)``. Configuration keys are set with
``--set KEY=VALUE`` (:mod:`sfl.cli.config`).

Every command starts by building the whole tree, so a group module imports at its top only
what its parsers need; what a command does (boto3, rich, torch, the stores) is imported when
it runs. ``sfl --help`` and ``sfl --version`` load none of it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

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
from sfl.cli.errors import FAILED, INTERRUPTED, USAGE, debugging, fail, silence_stdout

#: The distribution ``sfl`` comes from (``pyproject.toml``).
DISTRIBUTION = "serverless-federated-learning"

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


def version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


class VersionAction(argparse._VersionAction):
    """``--version``: the installed distribution's version, looked up only when asked."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        self.version = f"sfl {version()}"
        super().__call__(parser, namespace, values, option_string)


def says_its_default(action: argparse.Action) -> bool:
    """Whether an argument's help ends with its default: every option or positional that
    takes a value and has one (not a flag's False, an empty list or a computed None)."""
    taking = action.nargs != 0 and not isinstance(
        action, argparse._StoreConstAction | argparse._CountAction
    )
    return (
        taking
        and not action.required
        and action.default not in (None, argparse.SUPPRESS, [], ())
        and bool(
            action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        )
    )


class HelpFormatter(argparse.HelpFormatter):
    """Every default said the same way: ``(default: X)`` after the argument's help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if says_its_default(action) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line that names the command and its help, and
    each default in the help (``HelpFormatter``); every subcommand's parser is one too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sfl",
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 done, 1 failed (or did nothing of what was asked), 2 a usage or "
        "configuration mistake, 130 interrupted.",
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Whatever goes wrong is one line on stderr and an exit code
    (``sfl.cli.errors``), never a traceback; ``SFL_DEBUG=1`` shows one for what sfl did not
    expect."""
    args = build_parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `sfl ... | head` closed the pipe: nothing more to say
        silence_stdout()
        return FAILED
    except KeyboardInterrupt:
        return INTERRUPTED
    except ValueError as e:  # ConfigError, PartitionError, TaskError, ...: a clear message
        return fail(args.command, str(e), USAGE, as_json=as_json)
    except OSError as e:  # a file that is not there, a folder not writable, a full disk
        where = f": {e.filename}" if e.filename else ""
        return fail(args.command, f"{e.strerror or e}{where}", FAILED, as_json=as_json)
    except Exception as e:
        if debugging():
            raise
        return fail(
            args.command,
            f"unexpected {type(e).__name__}: {e} (set SFL_DEBUG=1 to see where)",
            FAILED,
            as_json=as_json,
        )


if __name__ == "__main__":
    sys.exit(main())
