"""Ingest throughput against the bare forward pass of the same tower; prints one JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/ingest.py [--images 320] [--batch-size 32] [--threads 2] [--precision bf16] [--runtime onnx]

"pipeline" is `Index.add` on a list of real JPEG files (read, decode, resize in worker
processes; encode; upsert into an embedded Qdrant Edge store). "bare" is `encoder.embed_pixels`
on the same images already decoded and resized in memory: the forward pass alone, at the same
batch size and thread count. The target is pipeline / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine
from mmrag.encoders import prepare_pixels

from mmrag import Index, load_encoder
from mmrag.media import load_image
from mmrag.sources import read_manifest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def real_photos(count: int) -> list[Path]:
    """Flickr8k dev photos from ../shared, else scikit-image's samples (repeated under new names)."""
    manifest = SHARED / "flickr8k" / "captions.jsonl"
    if manifest.is_file():
        return [entry.image for entry in read_manifest(manifest, split="dev")[:count]]
    from mmrag.samples import export_sample_photos

    folder = Path(tempfile.mkdtemp(prefix="bench-photos-"))
    samples = export_sample_photos(folder / "base")
    copies = []
    for i in range(count):  # distinct bytes per copy so ids differ
        target = folder / f"{i:05d}.jpg"
        target.write_bytes(samples[i % len(samples)].read_bytes() + i.to_bytes(4, "little"))
        copies.append(target)
    return copies


def bare_rate(encoder, photos: list[Path], batch_size: int) -> float:
    pixels = np.stack([prepare_pixels(load_image(p), encoder.preprocess) for p in photos])
    encoder.embed_pixels(pixels[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        encoder.embed_pixels(pixels[start : start + batch_size])
    return len(pixels) / (time.perf_counter() - started)


def pipeline_rate(encoder, photos: list[Path], batch_size: int, workers: int | None) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as folder, Index.open(Path(folder) / "bench", encoder) as index:
        index.add(photos[:batch_size], batch_size=batch_size, workers=workers, progress=False)  # warm-up
        report = index.add(photos, batch_size=batch_size, workers=workers, progress=False)
    assert report.added == len(photos) - batch_size and not report.skipped, report
    return report.added / report.seconds, report.stage_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: cores / 2)")
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="both passes, bare and pipeline")
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnx"], help="both passes, bare and pipeline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_encoder(args.encoder, precision=args.precision, runtime=args.runtime)
    photos = real_photos(args.images + args.batch_size)
    bare = bare_rate(encoder, photos[: args.images], args.batch_size)
    pipeline, stages = pipeline_rate(encoder, photos, args.batch_size, args.workers)
    print(json.dumps({
        "bench": "ingest",
        "encoder": encoder.spec,
        "precision": encoder.precision,
        "runtime": encoder.runtime,
        "images": args.images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "decode_workers": args.workers,
        "bare_images_per_s": round(bare, 2),
        "pipeline_images_per_s": round(pipeline, 2),
        "ratio": round(pipeline / bare, 3),
        "pipeline_stage_seconds": {k: round(v, 2) for k, v in stages.items()},
        "data": "flickr8k dev" if (SHARED / "flickr8k").is_dir() else "scikit-image samples",
        **machine(),
    }))


if __name__ == "__main__":
    main()
