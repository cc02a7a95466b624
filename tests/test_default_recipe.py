"""Opt-in (`-m slow`, about 30 minutes on 2 cores): each shipped tower's recipe, rerun, gives its file.

A shipped weights file records the recipe that made it (backbones, locking, loss, augmentation,
schedule, seed, splits) and the dev figures it reached. This test reruns that recipe from scratch
through examples/train_default_tower.py and checks that the new tower lands on the recorded
figures: the shipped file is what its recipe makes, not a lucky run. (When the shipped weights
were trained on train+dev, those dev figures are not held out; the model card gives the held-out
ones, from the same recipe on `train` alone, with the command.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from mmrag.encoders.mmrag_tower import SHIPPED, WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]


def shipped_metadata(tag: str) -> dict[str, str]:
    with safe_open(str(WEIGHTS_DIR / SHIPPED[tag]), "pt") as f:
        return f.metadata()


def recipe_arguments(meta: dict[str, str]) -> list[str]:
    """The example's command-line flags that rebuild the recipe recorded in a heads file."""
    config = json.loads(meta["train_config"])
    return ["--image-backbone", meta["image_backbone_name"], "--text-backbone", meta["text_backbone_name"],
            "--image-unlocked", str(config["image_unlocked"]), "--text-unlocked", str(config["text_unlocked"]),
            "--loss", config["loss"], "--augment", config["augment"], "--epochs", str(config["epochs"]),
            "--lr", str(config["lr"]), "--backbone-lr", str(config["backbone_lr"]), "--seed", str(config["seed"]),
            "--keep", config["keep"], "--train-splits", json.loads(meta["data"])["train_splits"]]


@pytest.mark.slow
@pytest.mark.parametrize("tag", sorted(SHIPPED))
def test_shipped_recipe_reproduces_its_dev_figures(flickr8k: Path, tmp_path: Path, tag: str) -> None:
    meta = shipped_metadata(tag)
    if "image_backbone_name" not in meta or "keep" not in json.loads(meta.get("train_config", "{}")):
        pytest.skip(f"{SHIPPED[tag]} predates recorded recipes (no backbone names or `keep` in its metadata)")
    recorded = json.loads(meta["dev_recall"])
    cmd = [sys.executable, str(REPO / "examples" / "train_default_tower.py"), "--data", str(flickr8k),
           "--out", str(tmp_path / "run"), "--cache", str(REPO / ".cache" / "train-features"), *recipe_arguments(meta)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    rerun = json.loads(result.stdout.strip().splitlines()[-1])
    for key, value in recorded.items():
        assert rerun["dev"][key] == pytest.approx(value, abs=0.01), key
