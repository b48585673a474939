#!/usr/bin/env bash
# Set up .venv with prism-agent and its dependencies; idempotent and quick when nothing changed.
#   scripts/setup.sh          runtime, with the plot extra (map show --plot)
#   scripts/setup.sh dev      plus test and lint tools (and promtool, from Debian's prometheus, and
#                             libfuse3, from Debian's fuse3, for the failing-disk tests)
#   scripts/setup.sh jetson   JetPack: keeps the torch already installed (NVIDIA's wheel) and
#                             installs everything else from pyproject.toml around it
# TORCH_INDEX_URL=<url> picks where torch comes from (e.g. PyTorch's CPU index on a machine
# whose pip would otherwise fetch the multi-GB CUDA build). On Jetson see README "Jetson".
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1:-}"
py="${PYTHON:-python3}"
case "$extra" in
    "" | dev | jetson) ;;
    *) echo "setup: unknown mode '$extra' (give nothing, dev or jetson)" >&2; exit 2 ;;
esac
venv=(-m venv)
if [ "$extra" = jetson ]; then
    venv=(-m venv --system-site-packages)  # JetPack's torch may live in the system site-packages
fi

if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: need Python >= 3.10 (found: $("$py" --version 2>&1 || echo none))" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$py" "${venv[@]}" .venv 2>/dev/null; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "setup: installing python3-venv" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$py" "${venv[@]}" .venv
        else
            echo "setup: '$py -m venv' failed; install python3-venv (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi

# debian WHAT PACKAGE...: install Debian packages (as root), or say which command would.
debian() {
    local what="$1"
    shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing $what (Debian: $*)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    else
        echo "setup: $what is missing; run: sudo apt-get install --no-install-recommends $*" >&2
        exit 1
    fi
}

# The agents' broker (hosted by the demo and the tests) and the stock MQTT clients.
if ! command -v mosquitto_pub >/dev/null || ! { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; }; then
    debian mosquitto mosquitto mosquitto-clients
fi
if [ "$extra" = dev ]; then
    # libfuse3, under the tests' failing disk (a FUSE filesystem whose writes fail with EIO).
    command -v fusermount3 >/dev/null || debian libfuse3 fuse3
    # Prometheus' promtool, which the tests run over a live agent's /metrics and the Grafana dashboard.
    command -v promtool >/dev/null || debian promtool prometheus
fi

stamp=".venv/.prism-setup-$extra"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "$extra" = jetson ]; then
    # NVIDIA's torch stays: prism-agent without its dependencies, then every other dependency of
    # pyproject.toml under a constraint that pins torch to the installed version.
    if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
        echo "setup: no torch in .venv: install NVIDIA's JetPack torch wheel first (see README 'Jetson')" >&2
        exit 1
    fi
    .venv/bin/python -c 'import torch; print(f"torch=={torch.__version__}")' > .venv/torch-pin.txt
    "${pip[@]}" --no-deps -e .
    .venv/bin/python scripts/jetson_deps.py --extra plot > .venv/jetson-requirements.txt
    "${pip[@]}" -c .venv/torch-pin.txt -r .venv/jetson-requirements.txt
    echo "$want" > "$stamp"
    exit 0
fi
# torch first and pinned, so nothing later can pull another build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
else
    "${pip[@]}" "torch==2.13.0"
fi
if [ "$extra" = dev ]; then
    "${pip[@]}" -e ".[dev]"
else
    "${pip[@]}" -e ".[plot]"
fi
echo "$want" > "$stamp"
