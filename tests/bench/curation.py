"""Caption-fit scores on Flickr8k dev with deliberately wrong pairs; prints one JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/curation.py [--encoder SPEC] [--fraction 0.2] [--seed 0] [--compare]

Takes the 1,000 dev images of ../shared/data/flickr8k (5 captions each), moves the captions of
`--fraction` of the images to other images of that set (`mmrag.curation.shuffle_captions`,
seeded), writes that manifest, and scores every pair with `mmrag.curation.score_pairs`, as
`mmrag score` does. Reports the ROC AUC of the score for telling right pairs from wrong ones,
the share of wrong pairs among the pairs `--keep-top 80%` drops, and the duplicate groups
`mmrag score` reports (with the highest near-duplicate cosine between two different photos,
for the margin under `--near-dup 0.95`), and how close resized copies of every 25th photo
(JPEG quality 80) stay to the original, on the photos' own embeddings and on the 48 px
near-duplicate embeddings (min and median cosine). `--compare` embeds the captions again to score the alternatives:
the cosine standardised per caption over all photos, and per photo over all captions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmrag import load_encoder
from mmrag.curation import (
    duplicate_groups,
    near_duplicate_vectors,
    roc_auc,
    score_pairs,
    select_pairs,
    shuffle_captions,
    write_manifest,
)
from mmrag.evaluate import embed_image_files
from mmrag.sources import read_manifest

FLICKR8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k"
SHRINK_FACTORS = (1, 1.5, 2, 3)


def resized_copies(encoder, photos: list[Path], folder: Path) -> dict[str, dict[str, list[float]]]:
    """Min and median cosine of each photo to its copy shrunk by each factor, per embedding."""
    copies = {factor: [] for factor in SHRINK_FACTORS}
    for photo in photos:
        with Image.open(photo) as image:
            for factor in SHRINK_FACTORS:
                copy = folder / f"{photo.stem}-{factor}.jpg"
                image.resize((round(image.width / factor), round(image.height / factor))).save(copy, quality=80)
                copies[factor].append(copy)
    out: dict[str, dict[str, list[float]]] = {}
    for name, embed in (("own", lambda paths: embed_image_files(encoder, paths, 32, None, False)),
                        ("48px", lambda paths: near_duplicate_vectors(encoder, paths, progress=False))):
        originals = embed(photos)
        for factor, paths in copies.items():
            cosines = (originals * embed(paths)).sum(axis=1)
            out.setdefault(f"1/{factor}", {})[name] = [round(float(cosines.min()), 3), round(float(np.median(cosines)), 3)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if not FLICKR8K.is_dir():
        raise SystemExit(f"needs {FLICKR8K} (the project's shared data)")

    encoder = load_encoder(args.encoder)
    entries, moved = shuffle_captions(read_manifest(FLICKR8K / "captions.jsonl", split="dev"), args.fraction, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "captions.jsonl"
        write_manifest(entries, manifest)
        started = time.perf_counter()
        scored = score_pairs(encoder, manifest, progress=False)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        near = near_duplicate_vectors(encoder, [e.image for e in scored.entries], progress=False)
        near_seconds = time.perf_counter() - started
        duplicates = duplicate_groups([e.image for e in scored.entries], near, 0.95)
        copies = resized_copies(encoder, [e.image for e in scored.entries[::25]], Path(folder))
    right = np.array([not moved[p.entry] for p in scored.pairs])
    scores = np.array([p.score for p in scored.pairs])
    kept = {(p.entry, p.caption_index) for p in select_pairs(scored.pairs, keep_fraction=0.8)}
    dropped_wrong = [not right[i] for i, p in enumerate(scored.pairs) if (p.entry, p.caption_index) not in kept]
    similarity = near @ near.T
    np.fill_diagonal(similarity, -1)
    result = {
        "bench": "curation_flickr8k_dev",
        "encoder": encoder.spec,
        "images": len(scored.entries),
        "pairs": len(scored.pairs),
        "wrong_pairs": int((~right).sum()),
        "seed": args.seed,
        "roc_auc": round(roc_auc(scores, right), 4),
        "mean_score_right": round(float(scores[right].mean()), 4),
        "mean_score_wrong": round(float(scores[~right].mean()), 4),
        "keep_top_80pct_dropped_wrong_share": round(float(np.mean(dropped_wrong)), 4),
        "exact_duplicate_groups": len(duplicates.exact),
        "near_duplicate_groups_at_0.95": len(duplicates.near),
        "max_near_dup_cosine_between_photos": round(float(similarity.max()), 4),
        "score_seconds": round(seconds, 1),
        "near_dup_seconds": round(near_seconds, 1),
        "resized_copies_min_median_cosine": copies,
    }
    if args.compare:
        texts = encoder.embed_texts([p.caption for p in scored.pairs], batch_size=128)
        owner = np.array([p.entry for p in scored.pairs])
        matrix = texts @ scored.image_vectors.T  # captions x photos
        per_caption = (scores - matrix.mean(axis=1)) / matrix.std(axis=1)
        per_photo = (scores - matrix.mean(axis=0)[owner]) / matrix.std(axis=0)[owner]
        result["compare_roc_auc"] = {"per caption over photos": round(roc_auc(per_caption, right), 4),
                                     "per photo over captions": round(roc_auc(per_photo, right), 4)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
