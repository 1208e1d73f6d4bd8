#!/usr/bin/env bash
# checkov on the synthesized CloudFormation template(s), in its own virtualenv (.venv-checkov):
# checkov's pins clash with the CDK's boto3, so it never shares the project's venv.
#
#   scripts/checkov.sh                    # checks cdk.out/*.template.json (run `make synth` first)
#   scripts/checkov.sh path/to/x.template.json ...
#   scripts/checkov.sh --install-only     # only create/refresh .venv-checkov
#
# Findings we accept are skipped per resource, each with its reason, in the template's own
# Metadata.checkov.skip (written by infra/compliance.py), never here.
set -euo pipefail

CHECKOV_VERSION="3.3.30"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHECKOV_VENV:-$ROOT/.venv-checkov}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/checkov" ]] || [[ "$("$VENV/bin/checkov" --version 2>/dev/null)" != "$CHECKOV_VERSION" ]]; then
    echo "installing checkov $CHECKOV_VERSION into $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi
if [[ "${1:-}" == "--install-only" ]]; then
    exit 0
fi

if [[ $# -eq 0 ]]; then
    shopt -s nullglob
    set -- "$ROOT"/cdk.out/*.template.json
    if [[ $# -eq 0 ]]; then
        echo "no template in $ROOT/cdk.out: run 'make synth' (npx cdk synth) first" >&2
        exit 2
    fi
fi

args=()
for template in "$@"; do
    args+=(--file "$template")
done
exec "$VENV/bin/checkov" "${args[@]}" \
    --framework cloudformation \
    --skip-download \
    --compact \
    --quiet
