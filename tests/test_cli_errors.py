"""Every command, driven with the mistakes people make: a missing file, a negative or huge
number, a wrong type, an unknown key or version, a closed pipe, no federation running. Each
is one line on stderr (a JSON object with ``--json``) and a non-zero exit code that means
what ``sfl --help`` says: 1 failed, 2 a usage or configuration mistake. Never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sfl.cli.main import DISTRIBUTION, main


def sfl(*argv: str) -> tuple[int, str, str]:
    """Run ``sfl ARGV`` in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's own exits (usage mistakes, --help, --version)
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def nothing_there() -> str:
    """A loopback endpoint nothing listens on: a local federation that has stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


USAGE_MISTAKES = [
    ("cost", "--clients", "-5"),
    ("cost", "--clients", "0"),
    ("cost", "--clients", "ten"),
    ("cost", "--model-bytes", "-1"),
    ("cost", "--rounds-per-day", "nan"),
    ("cost", "--rounds-per-day", "0"),
    ("cost", "--clients", "10", "--accepted", "50"),
    ("rounds", "--last", "-2"),
    ("rounds", "--last", "0"),
    ("watch", "--timeout", "-1"),
    ("watch", "--interval", "0"),
    ("watch", "--until-round", "abc"),
    ("models", "pull", "--out", "/nonexistent/dir/x"),
    ("models", "pull", "-3", "--out", "x"),
    ("models", "promote", "v2"),
    ("models", "rollback", "-1"),
    ("report", "--out", "/nonexistent/dir/report"),
    ("eval-data", "upload", "--file", "missing.safetensors"),
    ("simulate", "--clients", "0"),
    ("simulate", "--rounds", "-1"),
    ("simulate", "--crash-rate", "1.5"),
    ("simulate", "--clients", "2", "--attackers", "3"),
    ("simulate", "--set", "lr=abc"),
    ("simulate", "--set", "no_such_key=1"),
    ("simulate", "--task", "nosuch"),
    ("simulate", "--init-from", "missing.safetensors"),
    ("split-dataset", "--clients", "0", "--out", "x"),
    ("split-dataset", "--alpha", "-0.5", "--out", "x"),
    ("local", "up", "--clients", "0"),
    ("local", "up", "--schedule-seconds", "0"),
    ("logs", "--round", "0"),
    ("logs", "--since", "-1"),
    ("no-such-command",),
]


@pytest.mark.parametrize("argv", USAGE_MISTAKES, ids=" ".join)
def test_a_usage_mistake_is_one_line_and_exit_code_2(argv: tuple[str, ...], tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the checkout
    code, out, err = sfl(*argv)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("sfl"), err
    assert "Traceback" not in err and out == ""


OPERATOR_COMMANDS = [
    ("status",),
    ("rounds",),
    ("watch", "--timeout", "1"),
    ("devices",),
    ("report", "--out", "report"),
    ("models", "list"),
    ("models", "pull", "--out", "model.safetensors"),
    ("models", "promote", "1"),
    ("models", "rollback"),
    ("models", "rollback", "--cancel"),
    ("pause", "--reason", "maintenance"),
    ("resume",),
    ("start-round",),
    ("eval-data", "upload"),
    ("config", "show"),
    ("config", "set", "lr=0.1"),
    ("config", "history"),
    ("logs", "--round", "1"),
]


@pytest.mark.parametrize("argv", OPERATOR_COMMANDS, ids=" ".join)
def test_with_no_federation_running_every_operator_command_says_so_in_one_line(
    argv: tuple[str, ...], nothing_there: str, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, out, err = sfl(*argv, "--endpoint", nothing_there)
    assert code == 1, (out, err)
    assert err == (
        f"sfl {argv[0]}: nothing answers at {nothing_there}: is 'sfl local up' still running? "
        "(start it and pass the --endpoint it prints)\n"
    )
    assert not list(tmp_path.iterdir())  # nothing written


def test_in_json_mode_a_failure_is_a_json_object(nothing_there: str):
    code, out, err = sfl("status", "--json", "--endpoint", nothing_there)
    assert code == 1 and out == ""
    assert json.loads(err) == {
        "command": "status",
        "exit_code": 1,
        "error": f"nothing answers at {nothing_there}: is 'sfl local up' still running? "
        "(start it and pass the --endpoint it prints)",
    }


def test_version_names_the_installed_distribution():
    import importlib.metadata

    code, out, _ = sfl("--version")
    assert code == 0 and out == f"sfl {importlib.metadata.version(DISTRIBUTION)}\n"


def test_an_unexpected_error_is_one_line_unless_debugging(monkeypatch):
    from sfl.cli import cost

    def broken(args):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(cost, "_cost", broken)
    monkeypatch.delenv("SFL_DEBUG", raising=False)
    code, _, err = sfl("cost", "--model-bytes", "1000")
    assert code == 1
    assert err == (
        "sfl cost: unexpected RuntimeError: a bug over two lines (set SFL_DEBUG=1 to see where)\n"
    )
    monkeypatch.setenv("SFL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        sfl("cost", "--model-bytes", "1000")


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path):
    """``sfl ... --json | head -c 1``: the reader is gone before sfl writes."""
    reader_gone = subprocess.Popen(
        [sys.executable, "-m", "sfl.cli.main", "cost", "--model-bytes", "1000", "--json",
         "--region", "us-east-1", "--cdk-json", str(tmp_path / "none.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert reader_gone.stdout is not None
    reader_gone.stdout.close()
    _, err = reader_gone.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert reader_gone.returncode == 1
