#!/usr/bin/env bash
# Quickstart 2: set up (with dev tools), then run every check: ruff, mypy, the import contracts and
# the whole test suite.
# Extra arguments go to both pytest passes (below).
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
# Two passes: the few tests that time a split against local (marker `serial`) with the box to
# themselves, then the rest in PRISM_TEST_WORKERS processes (pytest-xdist, default 2; a file
# stays in one process, so its module fixtures are built once). Both run; the first failure's
# status is the command's.
workers="${PRISM_TEST_WORKERS:-2}"
status=0
echo "== pytest: tests that need the box to themselves"
"$bin/python" -m pytest -m serial "$@" || { code=$?; [ "$code" = 5 ] || status=$code; }  # 5: none selected
echo "== pytest: the rest, $workers at a time"
"$bin/python" -m pytest -m "not serial" -n "$workers" --dist loadfile "$@" || { code=$?; [ "$status" != 0 ] || status=$code; }
exit "$status"
