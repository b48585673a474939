#!/usr/bin/env bash
# Quickstart 1: set up, then the demo (prism-agent demo): profile a small performance map, start
# a broker and two agents with it, and watch auto mode on a fast and a slow link (two network
# namespaces as root, loopback otherwise). Extra arguments go to the demo, e.g. --json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec .venv/bin/prism-agent demo "$@"
