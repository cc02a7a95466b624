#!/usr/bin/env bash
# Create a virtual environment if missing and install mmrag into it, failing loudly if pip fails.
# Usage: bash examples/install.sh VENV [EXTRAS]      e.g. bash examples/install.sh .venv dev
# Used by both README commands: examples/quickstart.sh (no extras) and tests/run.sh (dev).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv=$1
target="$repo${2:+[$2]}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip_log=$(mktemp)
if ! "$venv/bin/python" -m pip install -q -e "$target" >"$pip_log" 2>&1; then
    tail -n 40 "$pip_log" >&2
    echo "pip could not install $target into $venv (its last lines above)" >&2
    exit 1
fi
grep -v "is ignored: it is neither" "$pip_log" >&2 || true
rm -f "$pip_log"
