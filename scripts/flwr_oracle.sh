#!/usr/bin/env bash
# Flower in its own virtualenv (.venv-flwr), as the test oracle for strategy parity
# (tests/test_flwr_parity.py): Flower's pins (packaging<26, its web stack) clash with the
# project's, so it never shares the project's venv.
#
#   scripts/flwr_oracle.sh                 # create/refresh .venv-flwr
set -euo pipefail

FLWR_VERSION="1.42.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLWR_VENV:-$ROOT/.venv-flwr}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]] \
    || [[ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("flwr"))' 2>/dev/null)" != "$FLWR_VERSION" ]]; then
    echo "installing flwr $FLWR_VERSION into $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "flwr==$FLWR_VERSION" 2>&1 \
        | sed -u '/is ignored/d'
fi
