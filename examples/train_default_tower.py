"""Train an ALIGN-style tower like the default one on Flickr8k, and measure it on `dev`.

    python examples/train_default_tower.py --data ../shared/data/flickr8k --out runs/lite0-t2-i1 \
        --image-unlocked 1 --text-unlocked 2

Trains on the manifest's `train` split (add `--train-splits train,dev` for the shipped weights
once a recipe is fixed) and evaluates each epoch on `dev`. Locked backbone outputs are cached
under --cache (default .cache/train-features), so reruns skip extraction. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mmrag.encoders.towers import AlignHeadsConfig, AlignTowers
from mmrag.encoders.trainer import TrainConfig, train_towers
from mmrag.sources import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding captions.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="run folder (model, curves, checkpoint)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/train-features"))
    parser.add_argument("--image-backbone", default="lite0")
    parser.add_argument("--text-backbone", default="minilm")
    parser.add_argument("--image-unlocked", type=int, default=0)
    parser.add_argument("--text-unlocked", type=int, default=0)
    parser.add_argument("--loss", default="clip", choices=["clip", "align", "siglip"])
    parser.add_argument("--augment", default="flip", choices=["none", "flip", "flip-gray", "crop"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone-lr", type=float, default=1e-4)
    parser.add_argument("--keep", default="best", choices=["best", "last"],
                        help="epoch kept: best on dev, or last (for a fixed recipe, or when dev is trained on)")
    parser.add_argument("--train-splits", default="train", help="comma-separated splits to train on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    manifest = args.data / "captions.jsonl"
    train = [(e.image, e.captions) for split in args.train_splits.split(",") for e in read_manifest(manifest, split=split)]
    dev = [(e.image, e.captions) for e in read_manifest(manifest, split="dev")]
    config = TrainConfig(loss=args.loss, image_unlocked=args.image_unlocked, text_unlocked=args.text_unlocked,
                         augment=args.augment, epochs=args.epochs, lr=args.lr, backbone_lr=args.backbone_lr,
                         keep=args.keep, seed=args.seed, num_threads=2)
    import torch

    torch.manual_seed(args.seed)
    towers = AlignTowers(args.image_backbone, args.text_backbone, AlignHeadsConfig())
    data = {"name": "flickr8k", "train_splits": args.train_splits, "train_images": len(train), "dev_images": len(dev)}
    result = train_towers(towers, train, dev, args.out, config, args.cache, data=data)
    print(json.dumps({"spec": result.spec, "best_epoch": result.best_epoch, "dev": result.dev_recall,
                      "dev_mean": sum(result.dev_recall.values()) / 6, "seconds": round(result.seconds)}))


if __name__ == "__main__":
    main()
