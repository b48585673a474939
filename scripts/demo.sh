#!/usr/bin/env bash
# Quickstart 1: set up, then run the main job (prism-agent demo). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec .venv/bin/prism-agent demo "$@"
