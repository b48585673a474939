#!/usr/bin/env bash
# Quickstart 2: set up (with dev tools), then run every check: ruff, mypy, the import contracts and
# the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bin=.venv/bin
echo "== ruff"
"$bin/ruff" check .
"$bin/ruff" format --check .
echo "== mypy"
"$bin/mypy"
echo "== import contracts"
"$bin/lint-imports"
echo "== pytest"
"$bin/python" -m pytest "$@"
