"""Reproduce the default tower's shipped heads (mmrag:lite0-minilm@flickr8k-v1).

    python examples/train_default_tower.py --data ../shared/data/flickr8k \
        --out encoders/weights/lite0-minilm-flickr8k-v1.safetensors

Trains on the manifest's `train` split and selects the epoch on its `dev` split. Backbone
features are cached under --cache (default .cache/train-features), so reruns skip extraction.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mmrag.encoders.train import TrainConfig, train_heads


def read_manifest(manifest: Path, split: str) -> list[tuple[Path, list[str]]]:
    """captions.jsonl -> [(image path, captions)] for one split; paths resolve against the manifest."""
    pairs = []
    with manifest.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row["split"] == split:
                    pairs.append((manifest.parent / row["image"], list(row["captions"])))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding captions.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="heads file to write (.safetensors)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/train-features"))
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    manifest = args.data / "captions.jsonl"
    train, dev = read_manifest(manifest, "train"), read_manifest(manifest, "dev")
    config = TrainConfig(epochs=args.epochs, seed=args.seed, num_threads=2)
    data = {"name": "flickr8k", "manifest": str(manifest.name), "train_images": len(train), "dev_images": len(dev)}
    result = train_heads(train, dev, args.out, config, args.cache, data=data)
    print(json.dumps({"path": str(result.path), "best_epoch": result.best_epoch, "dev": result.dev_recall,
                      "seconds": round(result.seconds)}, indent=2))


if __name__ == "__main__":
    main()
