"""Zero-shot text-to-image precision@5 on coco_mini; prints one JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/zero_shot_coco.py [--encoder SPEC] [--min-photos 5]

Indexes ../shared/data/coco_mini (159 COCO photos) into a temporary embedded index, then for each
COCO category present in at least --min-photos photos searches "a photo of a {category}" and
counts how many of the top 5 photos have that category. Reports the mean over categories, and
the zero-shot classification mAP over all categories with the default prompt templates
(`mmrag.evaluate.evaluate_zero_shot`, what `mmrag eval` prints).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from mmrag import Index
from mmrag.evaluate import evaluate_zero_shot
from mmrag.sources import read_manifest

COCO_MINI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco_mini"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--min-photos", type=int, default=5)
    parser.add_argument("--template", default="a photo of a {}")
    args = parser.parse_args()
    if not COCO_MINI.is_dir():
        raise SystemExit(f"needs {COCO_MINI} (the project's shared data)")

    counts = Counter(c for entry in read_manifest(COCO_MINI / "captions.jsonl") for c in set(entry.metadata["categories"]))
    categories = sorted(c for c, n in counts.items() if n >= args.min_photos)
    per_category = {}
    with tempfile.TemporaryDirectory() as folder, Index.open(Path(folder) / "coco", args.encoder) as index:
        index.add(COCO_MINI, progress=False)
        for category in categories:
            hits = index.search(args.template.format(category), k=5)
            per_category[category] = sum(category in h.payload["categories"] for h in hits) / 5
        spec = index.encoder.spec
        zero_shot = evaluate_zero_shot(index.encoder, COCO_MINI / "captions.jsonl", progress=False)
    mean = sum(per_category.values()) / len(per_category)
    print(json.dumps({
        "bench": "zero_shot_coco_precision_at_5",
        "encoder": spec,
        "template": args.template,
        "categories": len(categories),
        "min_photos": args.min_photos,
        "mean_precision_at_5": round(mean, 4),
        "per_category": {c: round(p, 2) for c, p in per_category.items()},
        "zero_shot_mAP": round(zero_shot.mAP, 4),
        "zero_shot_chance": round(zero_shot.chance, 4),
        "zero_shot_labels": zero_shot.labels,
        "zero_shot_templates": len(zero_shot.templates),
    }))


if __name__ == "__main__":
    main()
