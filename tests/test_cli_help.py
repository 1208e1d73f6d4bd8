"""Every ``sfl`` command explains each of its arguments, says its defaults, and speaks the
user's language.

The parsers are walked as ``sfl.cli.main`` builds them: every option and positional has a
help text; every argument with a default says it once, the way ``sfl.cli.main``'s help
formatter adds it for all; and nothing the CLI and the operator's tools can print names the
project's internals (issue numbers, "the seed" for the code this project started from, the
names of that code's files).
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfl.cli.main import build_parser, says_its_default

ROOT = Path(__file__).resolve().parents[1]
#: Words a user who never saw this project's history would not understand.
INTERNAL = re.compile(
    r"issue\s*#?\s*\d+|\bthe seed\b(?!\s*(?:for|of|=))|seed's (?:addendum|code|key feature)"
    r"|\b(?:CreatePickle|LoadData|AverageModels|CheckThreshold|ChooseClients"
    r"|SleepTilNextRound|UpdateInitiatorTimer)\b",
    re.IGNORECASE,
)
#: Where every line the CLI and the operator's tools print is written.
USER_FACING = ("sfl/cli", "sfl/ops")
#: What loads when a command runs that needs it, never to parse a command line.
HEAVY = ("boto3", "botocore", "awscrt", "rich", "torch", "numpy", "moto")


def parsers(
    parser: argparse.ArgumentParser | None = None,
) -> Iterator[argparse.ArgumentParser]:
    """The root parser and every subcommand's, depth first."""
    parser = parser or build_parser()
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases: once each
                yield from parsers(child)


def arguments(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The options and positionals a user types (not --help, --version or subcommands)."""
    for action in parser._actions:
        if isinstance(
            action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction
        ):
            continue
        yield action


def name(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"


ALL = [(p, a) for p in parsers() for a in arguments(p)]


def test_the_walk_finds_every_command() -> None:
    progs = {p.prog for p in parsers()}
    for expected in ("sfl simulate", "sfl local up", "sfl models list", "sfl devices"):
        assert expected in progs


@pytest.mark.parametrize(("parser", "action"), ALL, ids=[name(p, a) for p, a in ALL])
def test_every_argument_has_a_help_text(
    parser: argparse.ArgumentParser, action: argparse.Action
) -> None:
    assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, (
        f"{name(parser, action)} has no help text"
    )


@pytest.mark.parametrize(("parser", "action"), ALL, ids=[name(p, a) for p, a in ALL])
def test_every_default_is_said_once_the_same_way(
    parser: argparse.ArgumentParser, action: argparse.Action
) -> None:
    """``sfl.cli.main.HelpFormatter`` appends ``(default: X)``; a help text that says it
    again in its own words would say it twice."""
    if not says_its_default(action):
        return
    shown = parser._get_formatter()._expand_help(action)
    assert shown.endswith(f"(default: {action.default})"), shown
    assert shown.lower().count("default") == 1, f"{name(parser, action)}: {shown!r}"


def test_help_speaks_the_users_language() -> None:
    for parser in parsers():
        text = parser.format_help()
        found = INTERNAL.search(text)
        assert found is None, f"'{parser.prog} --help' says {found.group(0)!r}"


def strings(path: Path) -> Iterator[tuple[int, str]]:
    """The string literals of a module (messages, help texts), not its comments."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


@pytest.mark.parametrize(
    "path",
    sorted(p for folder in USER_FACING for p in (ROOT / folder).glob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_messages_speak_the_users_language(path: Path) -> None:
    for line, text in strings(path):
        found = INTERNAL.search(text)
        assert found is None, f"{path.relative_to(ROOT)}:{line} says {found.group(0)!r}"


@pytest.mark.parametrize("doc", ["README.md", "docs/local-mode.md"])
def test_the_first_pages_speak_the_users_language(doc: str) -> None:
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        found = INTERNAL.search(line)
        assert found is None, f"{doc}:{number} says {found.group(0)!r}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["status", "--help"]])
def test_the_command_line_starts_without_the_aws_sdk_rich_or_torch(argv: list[str]) -> None:
    """Every command starts by building every parser: what only some commands use (the AWS
    SDK, rich, torch) is imported when one of those runs, so ``sfl --help`` and
    ``sfl --version`` stay quick."""
    code = (
        "import sys\n"
        "from sfl.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip(), "it printed nothing"
    loaded = set(done.stderr.split())
    assert "sfl" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
