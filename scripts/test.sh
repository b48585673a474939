#!/usr/bin/env bash
# Quickstart 2: set up (with dev tools), then run every check: ruff, mypy and the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# The integration tests run a real broker and the stock MQTT clients.
if ! command -v mosquitto_pub >/dev/null || ! { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing mosquitto (Debian packages)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    else
        echo "test: mosquitto is missing; run: sudo apt-get install mosquitto mosquitto-clients" >&2
        exit 1
    fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bin=.venv/bin
echo "== ruff"
"$bin/ruff" check .
"$bin/ruff" format --check .
echo "== mypy"
"$bin/mypy"
echo "== pytest"
"$bin/python" -m pytest "$@"
