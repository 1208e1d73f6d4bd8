"""``sfl local up`` as an operator runs it: a process that prints its endpoint and reports
rounds as they close, serves the command it printed from a fresh shell (the user's own AWS
configuration in place and untouched), stops cleanly on SIGTERM, and after it stopped the
same command says so in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real process: start-up imports torch and writes the splits

USER_AWS_CONFIG = "[default]\nregion = us-west-2\n"
USER_AWS_CREDENTIALS = "[default]\naws_access_key_id = AKIAUSERSOWNKEY00000\n"


def _lines(process: subprocess.Popen[str]) -> list[str]:
    """The process's output lines so far, read by a thread as they come."""
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for(lines: list[str], pattern: str, process: subprocess.Popen[str], seconds: float):
    deadline = time.time() + seconds
    while True:
        for line in list(lines):
            if found := re.search(pattern, line):
                return found
        assert process.poll() is None, "\n".join(lines)
        assert time.time() < deadline, f"no line matching {pattern!r}:\n" + "\n".join(lines)
        time.sleep(0.2)


def test_local_up_serves_the_printed_command_from_a_fresh_shell_and_stops(tmp_path: Path):
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "config").write_text(USER_AWS_CONFIG)
    (home / ".aws" / "credentials").write_text(USER_AWS_CREDENTIALS)
    # A fresh shell: the user's PATH and HOME (with their AWS profile), nothing exported.
    shell = {"PATH": os.environ["PATH"], "HOME": str(home)}
    env_file = tmp_path / "env"
    up = subprocess.Popen(
        [sys.executable, "-m", "sfl.cli.main", "local", "up", "--clients", "2", "--out",
         str(tmp_path / "run"), "--env-file", str(env_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=shell,
    )  # fmt: skip
    lines = _lines(up)
    try:
        printed = _wait_for(lines, r"from any shell: (sfl status --endpoint (\S+))$", up, 120)
        command, endpoint = printed.group(1), printed.group(2)
        assert endpoint.startswith("http://127.0.0.1:")
        deadline = time.time() + 120
        while True:
            status = subprocess.run(
                [sys.executable, "-m", "sfl.cli.main", *command.split()[1:], "--json"],
                env=shell, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert status.returncode == 0, status.stderr
            shown = json.loads(status.stdout)
            if shown["active_devices"] == 2 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert shown["stack"] == "Sfl-Federation" and shown["local"] is True
        assert shown["active_devices"] == 2
        # Rounds are reported as they close, scored.
        _wait_for(lines, r"^round 1 CLOSED: \d+/\d+ accepted, accuracy 0\.\d{4}$", up, 120)
        logs = subprocess.run(
            [sys.executable, "-m", "sfl.cli.main", "logs", "--endpoint", endpoint, "--round", "1",
             "--json"],
            env=shell, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert logs.returncode == 0, logs.stderr
        about_round_1 = json.loads(logs.stdout)
        assert about_round_1 and all(line["round"] == 1 for line in about_round_1)
        assert any(line["message"] == "update accepted" for line in about_round_1)
        exports = env_file.read_text()  # for scripts, on request only
        assert "AWS_ENDPOINT_URL=" + endpoint in exports and "AWS_ACCESS_KEY_ID" not in exports
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=90)
    assert up.returncode == 0, "\n".join(lines)
    assert any(line.startswith("sfl local up: stopping") for line in lines)
    assert (home / ".aws" / "config").read_text() == USER_AWS_CONFIG
    assert (home / ".aws" / "credentials").read_text() == USER_AWS_CREDENTIALS

    after = subprocess.run(
        [sys.executable, "-m", "sfl.cli.main", *command.split()[1:]],
        env=shell, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert after.returncode == 1
    assert after.stderr.count("\n") == 1 and "is 'sfl local up' still running?" in after.stderr
