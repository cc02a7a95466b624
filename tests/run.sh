#!/usr/bin/env bash
# Set up a virtual environment with mmrag and its test extras (if needed), then run the tests.
# Usage: bash tests/run.sh [pytest args]     e.g. bash tests/run.sh -m slow   (opt-in slow runs)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MMRAG_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$venv/bin/python" -m pytest "$@"
