"""The examples run as a user would run them, and say what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_search_photos_example(tmp_path):
    index = tmp_path / "example.mmrag"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "search_photos.py"), "--index", str(index), "--query", "a cat"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first_hit = lines[lines.index("text -> image: 'a cat'") + 1]
    assert first_hit.endswith("cat_chelsea.jpg")
    assert "added 10, updated 0, already present 0, skipped 0" in result.stdout
    assert index.with_suffix(".png").is_file()
