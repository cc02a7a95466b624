#!/usr/bin/env bash
# The main job: index a folder of photos into an embedded Qdrant store, then search it by text.
# Usage: bash examples/quickstart.sh [PHOTO_FOLDER] [QUERY]
#   no folder: scikit-image's bundled sample photos (offline, anywhere)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv=${MMRAG_VENV:-$repo/.venv}
bash "$repo/examples/install.sh" "$venv"
export HF_HUB_OFFLINE=1
index=${MMRAG_INDEX:-$repo/quickstart.mmrag}
query=${2:-a cat}
if [ -n "${1:-}" ]; then "$venv/bin/mmrag" index "$1" --index "$index"; else "$venv/bin/mmrag" index --index "$index"; fi
echo "searching for: $query"
"$venv/bin/mmrag" search "$query" --index "$index" -k 5
