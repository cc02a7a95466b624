"""Training throughput (image-caption pairs per second) and peak memory; one JSON line per setup.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/train.py [--images 1024] [--setups align-locked,...]
    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/train.py --precision bf16    # on a GPU

Each setup runs in its own process (so its peak RSS is its own): one epoch to fill the feature
cache and warm up, then `--epochs` timed epochs. "pairs/s" counts training steps only (not the
cached extraction, not the per-epoch dev evaluation). Data: the first `--images` Flickr8k `train`
photos (one caption drawn per image per epoch), dev = 200 `dev` photos.

Setups:
    align-locked     Lite0 + MiniLM fully locked: heads on cached features (the default tower's recipe)
    align-i1-t2      Lite0's final conv and MiniLM's last two layers unlocked, on cached prefixes
    align-full       both backbones trained from pixels / token ids, random crops (batch 32)
    openclip-tiny    a tiny open_clip ViT from scratch, random crops (wiring scale, not quality)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SETUPS = {
    "align-locked": dict(style="align", image_unlocked=0, text_unlocked=0, augment="flip", batch_size=256),
    "align-i1-t2": dict(style="align", image_unlocked=1, text_unlocked=2, augment="flip", batch_size=256),
    "align-full": dict(style="align", image_unlocked=-1, text_unlocked=-1, augment="crop", batch_size=32),
    "openclip-tiny": dict(style="openclip", image_unlocked=-1, text_unlocked=-1, augment="crop", batch_size=128),
}
TINY_CLIP_CFG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 128, "layers": 4, "width": 256, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def run_setup(name: str, images: int, epochs: int, precision: str, cache: Path) -> dict:
    """One setup, in this process: warm-up epoch, then timed epochs; returns the figures."""
    import torch
    from mmrag.encoders.towers import AlignTowers, OpenClipTowers
    from mmrag.encoders.trainer import TrainConfig, train_towers

    from mmrag.sources import captioned_pairs

    manifest = SHARED / "flickr8k" / "captions.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"needs {manifest} (the project's shared data)")
    train = captioned_pairs(manifest, split="train")[:images]
    dev = captioned_pairs(manifest, split="dev")[:200]
    setup = dict(SETUPS[name])
    style = setup.pop("style")
    torch.manual_seed(0)
    if style == "align":
        towers = AlignTowers("lite0", "minilm")
    else:
        import open_clip

        config_path = cache / "mmrag-bench-TinyViT.json"
        config_path.write_text(json.dumps(TINY_CLIP_CFG))
        open_clip.add_model_config(config_path)
        towers = OpenClipTowers("openclip:mmrag-bench-TinyViT")
    config = TrainConfig(epochs=1 + epochs, patience=0, warmup_steps=1, precision=precision, num_threads=None, **setup)
    with tempfile.TemporaryDirectory() as out:
        result = train_towers(towers, train, dev, out, config, cache)
    timed = result.history[1:]
    rates = [row["pairs_per_second"] for row in timed]
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "bench": "train", "setup": name, "images": len(train), "batch_size": setup["batch_size"],
        "precision": precision, "epochs_timed": len(timed),
        "pairs_per_second": round(sum(rates) / len(rates), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_gpu_mib": None if peak_gpu is None else round(peak_gpu),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up one")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench-train"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setup in this process
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_setup(args.one, args.images, args.epochs, args.precision, args.cache)))
        return
    for name in args.setups.split(","):
        if name not in SETUPS:
            raise SystemExit(f"unknown setup {name!r}; known: {', '.join(SETUPS)}")
        cmd = [sys.executable, __file__, "--one", name, "--images", str(args.images), "--epochs", str(args.epochs),
               "--precision", args.precision, "--cache", str(args.cache)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
