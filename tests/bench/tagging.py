"""Zero-shot tagging on coco_mini against its COCO categories; prints one JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/tagging.py [--encoder SPEC]

Indexes the 159 photos of ../shared/data/coco_mini into a temporary embedded index and tags them
with every category present (80 labels, `mmrag.zeroshot.DEFAULT_TEMPLATES`), the way `Index.tag`
does. From the payloads written: mAP (`tag_scores`, each label ranking the photos) and micro
precision / recall of `tags` at the default threshold and cap, and at other thresholds.

For the choice of calibration, the same image and label vectors are also scored by the
alternatives: raw cosine, each label standardised over the photos, each photo standardised over
the labels. For each: mAP, the best F1 of any one cut-off and where it lies, and the F1 of a
cut-off chosen on one half of the photos and applied to the other (20 random halvings).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mmrag import Index
from mmrag.sources import read_manifest
from mmrag.tagging import DEFAULT_THRESHOLD, DEFAULT_TOP, Tagger, tag_store
from mmrag.zeroshot import mean_average_precision

COCO_MINI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco_mini"


def precision_recall(tagged: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hits = (tagged & truth).sum()
    return float(hits / max(tagged.sum(), 1)), float(hits / truth.sum())


def capped(scores: np.ndarray, threshold: float, top: int | None) -> np.ndarray:
    """What `Tagger.payloads` tags: score >= threshold and among the photo's `top` best."""
    over = scores >= threshold
    return over if top is None else over & (np.argsort(np.argsort(-scores, axis=1), axis=1) < top)


def best_f1(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The best F1 of one cut-off over all (photo, label) scores, and that cut-off."""
    flat, relevant = scores.ravel(), truth.ravel()
    order = np.argsort(-flat, kind="stable")
    hits = np.cumsum(relevant[order])
    precision, recall = hits / np.arange(1, len(flat) + 1), hits / relevant.sum()
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(f1.argmax())
    return float(f1[best]), float(flat[order][best])


def held_out_f1(scores: np.ndarray, truth: np.ndarray, rounds: int = 10) -> float:
    """Mean F1 of a cut-off chosen on a random half of the photos, applied to the other half."""
    rng, results = np.random.default_rng(0), []
    for _ in range(rounds):
        order = rng.permutation(len(scores))
        for fit, test in ((order[::2], order[1::2]), (order[1::2], order[::2])):
            _, cut = best_f1(scores[fit], truth[fit])
            precision, recall = precision_recall(scores[test] >= cut, truth[test])
            results.append(2 * precision * recall / max(precision + recall, 1e-12))
    return float(np.mean(results))


def standardise(scores: np.ndarray, axis: int) -> np.ndarray:
    return (scores - scores.mean(axis=axis, keepdims=True)) / scores.std(axis=axis, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default=None)
    args = parser.parse_args()
    if not COCO_MINI.is_dir():
        raise SystemExit(f"needs {COCO_MINI} (the project's shared data)")

    entries = read_manifest(COCO_MINI / "captions.jsonl")
    labels = sorted({c for e in entries for c in e.categories})
    truth_of = {str(e.image.resolve()): set(e.categories) for e in entries}
    with tempfile.TemporaryDirectory() as folder, Index.open(Path(folder) / "coco", args.encoder) as index:
        index.add([e.image for e in entries], progress=False)
        started = time.perf_counter()
        tagger = Tagger.build(index.encoder, labels)
        report = tag_store(index.store, tagger, progress=False)
        seconds = time.perf_counter() - started
        hits = [hit for page in index.store.scroll(with_vectors=True) for hit in page]
        spec = index.encoder.spec
    truth = np.array([[label in truth_of[h.payload["uri"]] for label in labels] for h in hits])
    stored = np.array([[h.payload["tag_scores"][label] for label in labels] for h in hits])
    tagged = np.array([[label in h.payload["tags"] for label in labels] for h in hits])
    mAP, _ = mean_average_precision(stored, truth)
    precision, recall = precision_recall(tagged, truth)

    cosine = np.stack([h.vectors["image"] for h in hits]) @ tagger.label_vectors.T
    calibrations = {
        "raw cosine": cosine,
        "per label over the photos": standardise(cosine, axis=0),
        "per photo over the labels": standardise(cosine, axis=1),
        "per photo over the reference concepts (chosen)": tagger.scores(np.stack([h.vectors["image"] for h in hits])),
    }
    compared = {}
    for name, scores in calibrations.items():
        f1, cut = best_f1(scores, truth)
        compared[name] = {"mAP": round(mean_average_precision(scores, truth)[0], 4), "best_f1": round(f1, 4),
                          "best_cut": round(cut, 3), "held_out_f1": round(held_out_f1(scores, truth), 4)}
    sweep = {}
    for threshold in (1.5, 2.0, 2.5, 3.0):
        p, r = precision_recall(capped(stored, threshold, DEFAULT_TOP), truth)
        sweep[str(threshold)] = {"precision": round(p, 4), "recall": round(r, 4)}
    print(json.dumps({
        "bench": "tagging_coco_mini",
        "encoder": spec,
        "photos": report.photos,
        "labels": len(labels),
        "threshold": DEFAULT_THRESHOLD,
        "top": DEFAULT_TOP,
        "mAP": round(mAP, 4),
        "chance": round(float(truth.mean(axis=0).mean()), 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "tags_per_photo": round(float(tagged.sum(axis=1).mean()), 2),
        "categories_per_photo": round(float(truth.sum(axis=1).mean()), 2),
        "photos_tagged": report.tagged,
        "tag_seconds": round(seconds, 1),
        "thresholds_top5": sweep,
        "calibrations": compared,
    }))


if __name__ == "__main__":
    main()
