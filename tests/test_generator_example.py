"""examples/train_generator.py --quick runs end to end and writes what it promises.

It proves the wiring (cache, accelerate training, guided sampling, tower-based measurement, grid),
not image quality: three training steps cannot condition anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_generator_quick_mode(tmp_path, flickr8k):
    data = flickr8k
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_generator.py"),
         "--quick", "--out", str(out), "--data", str(data)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    printed = json.loads(result.stdout.strip().splitlines()[-1])
    saved = json.loads((out / "results.json").read_text())
    assert printed["margin"] == saved["margin"]
    assert saved["mode"] == "quick" and saved["steps"] >= 1 and saved["prompts"] == 8
    for key in ("margin", "mean_own", "mean_shuffled", "p_permutation", "p_ttest", "train_seconds", "final_loss"):
        assert np.isfinite(saved[key]), key
    assert 0.0 < saved["p_permutation"] <= 1.0 and 0.0 <= saved["p_ttest"] <= 1.0
    assert saved["image_shape"] == [32, 32, 3]

    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 8
    pixels = np.stack([np.asarray(Image.open(path)) for path in samples])
    assert pixels.shape == (8, 32, 32, 3) and pixels.dtype == np.uint8 and pixels.std() > 0
    grid = Image.open(saved["grid"])
    assert Path(saved["grid"]) == out / "grid.png" and grid.size[0] > 256 and grid.size[1] > 128
