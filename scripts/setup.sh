#!/usr/bin/env bash
# Installs everything the example and the tests need, on a fresh machine: a virtualenv in .venv with this
# package and its extras (versions from constraints.txt), Debian's prometheus (for promtool and the
# Prometheus server the end-to-end tests start), wrk (the benchmarks' load generator) and valgrind (their
# instruction counts). The install compiles the optional C extension kserve_otel.recording._speedups (gcc and Python's
# headers). Re-running it skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.kserve-otel-installed"
want=$(cat pyproject.toml constraints.txt setup.py kserve_otel/recording/_speedups.c kserve_otel/export/_otlp.c | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
    echo "$want" > "$stamp"
fi

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 || ! command -v wrk >/dev/null 2>&1 || ! command -v valgrind >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "setup: Debian's prometheus is needed: run as root or install sudo" >&2; exit 1; }
        SUDO="sudo"
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus wrk valgrind >/dev/null
fi
