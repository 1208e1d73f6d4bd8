"""``sfl local up`` as an operator runs it: a process that prints its endpoint and the shell
exports, serves ``sfl`` commands from another process, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real process: start-up imports torch and writes the splits


def test_local_up_serves_commands_from_another_process_and_stops(tmp_path: Path):
    env_file = tmp_path / "env"
    up = subprocess.Popen(
        [sys.executable, "-m", "sfl.cli.main", "local", "up", "--clients", "2", "--out",
         str(tmp_path / "run"), "--env-file", str(env_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (env_file.exists() and env_file.read_text().endswith("\n")):
            assert up.poll() is None, up.communicate()[0]
            assert time.time() < deadline, "sfl local up printed no endpoint within 120 s"
            time.sleep(0.5)
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in env_file.read_text().split("\n")
            if line
        )  # fmt: skip
        assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert "AWS_ACCESS_KEY_ID" not in exports  # credentials come from the loopback endpoint
        shell = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **exports}
        while True:
            status = subprocess.run(
                [sys.executable, "-m", "sfl.cli.main", "status", "--json"],
                env=shell, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert status.returncode == 0, status.stderr
            shown = json.loads(status.stdout)
            if shown["active_devices"] == 2 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert shown["stack"] == "Sfl-Federation" and shown["local"] is True
        assert shown["active_devices"] == 2
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=90)
    assert up.returncode == 0, out
    assert f"endpoint: {exports['AWS_ENDPOINT_URL']}" in out
    assert "sfl local up: stopping" in out
