#!/usr/bin/env bash
# Set up a virtual environment with mmrag and its test extras (if needed), then run the tests.
# Usage: bash tests/run.sh [pytest args]     e.g. bash tests/run.sh -m slow   (opt-in slow runs)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MMRAG_VENV:-.venv}
bash examples/install.sh "$venv" dev
# The browser test (tests/test_serve.py) drives Debian's Chromium: install it where we may (CI runs as root).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser test" >&2
    apt_log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
             chromium fonts-liberation; } >"$apt_log" 2>&1; then
        tail -n 20 "$apt_log" >&2
        echo "could not install chromium (apt-get's last lines above)" >&2
        exit 1
    fi
    rm -f "$apt_log"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$venv/bin/python" -m pytest "$@"
