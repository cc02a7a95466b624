"""Curating a captions manifest: how well each caption fits its photo, and duplicate photos.

    scored = score_pairs(encoder, "data/captions.jsonl")         # one PairScore per (image, caption)
    write_scores(scored.pairs, "scores.csv")                     # .jsonl or .csv, by suffix
    kept = select_pairs(scored.pairs, keep_fraction=0.8)         # or min_score=..., keep_count=...
    write_manifest(filtered_entries(scored.entries, kept), "clean/captions.jsonl")
    paths = [e.image for e in scored.entries]
    duplicate_groups(paths, near_duplicate_vectors(encoder, paths))

A pair's score is the cosine of the photo's and the caption's embeddings (CLIPScore without
its rescaling). With the default tower it tells right pairs from shuffled ones on Flickr8k dev
with ROC AUC 0.975; standardising it per caption or per photo over the manifest did not do
better (docs/curation.md). Cosines are encoder-specific, so a `min_score` holds for one encoder
only; `keep_fraction` does not depend on the encoder.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .encoders import Encoder, PreprocessConfig, prepare_pixels
from .evaluate import embed_image_files, in_split
from .ingest import bounded_map, default_workers
from .media import content_hash, load_image, read_bytes
from .sources import ManifestEntry, read_manifest

SCORE_SUFFIXES = (".jsonl", ".csv")
#: Short side (px) photos are shrunk to before their near-duplicate embedding (`near_duplicate_vectors`).
NEAR_DUP_SIDE = 48


@dataclass(frozen=True)
class PairScore:
    """One (image, caption) pair of a manifest and how well they match (cosine, -1..1)."""

    #: position of the image's line among the manifest's entries read
    entry: int
    image: str
    #: position of the caption in that line's `captions`
    caption_index: int
    caption: str
    score: float


@dataclass(frozen=True)
class ScoredManifest:
    """`score_pairs`'s result: the entries, one image vector per entry, and every pair's score."""

    entries: list[ManifestEntry]
    image_vectors: np.ndarray
    pairs: list[PairScore]


@dataclass(frozen=True)
class Duplicates:
    """Groups of duplicate photos (paths as given, first seen first), two or more per group."""

    #: identical bytes (same content hash)
    exact: list[list[str]]
    #: embedding cosine >= `near_threshold`, linked transitively; an exact group takes part by its first path
    near: list[list[str]]
    near_threshold: float


def score_pairs(
    encoder: Encoder,
    manifest: str | Path,
    *,
    split: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> ScoredManifest:
    """Embed every image and caption of `manifest` (optionally one `split`) and score each pair.

    Empty captions have no pair. Any unreadable image is an error (ValueError naming it).
    """
    entries = read_manifest(manifest, split=split)
    if not entries:
        raise ValueError(f"{manifest} has no entries" + in_split(split))
    image_vectors = embed_image_files(encoder, [e.image for e in entries], batch_size, workers, progress)
    owners = [(i, j, c) for i, e in enumerate(entries) for j, c in enumerate(e.captions) if c.strip()]
    pairs = []
    if owners:
        text_vectors = encoder.embed_texts([caption for _, _, caption in owners], batch_size=128)
        scores = np.einsum("nd,nd->n", text_vectors, image_vectors[[i for i, _, _ in owners]])
        pairs = [
            PairScore(i, os.path.abspath(entries[i].image), j, caption, float(score))
            for (i, j, caption), score in zip(owners, scores)
        ]
    return ScoredManifest(entries, image_vectors, pairs)


def write_scores(pairs: Sequence[PairScore], path: str | Path) -> None:
    """One row per pair, JSON lines or CSV by the file's suffix (`check_scores_path`)."""
    path = check_scores_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as out:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(PairScore)])
            writer.writeheader()
            writer.writerows(asdict(p) for p in pairs)
        else:
            out.writelines(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs)


def check_scores_path(path: str | Path) -> Path:
    """`path` if it ends in .jsonl or .csv, else ValueError (checked before any embedding)."""
    path = Path(path)
    if path.suffix.lower() not in SCORE_SUFFIXES:
        raise ValueError(f"scores are written as .jsonl or .csv, by suffix; got {path.name!r}")
    return path


def select_pairs(
    pairs: Sequence[PairScore],
    *,
    min_score: float | None = None,
    keep_count: int | None = None,
    keep_fraction: float | None = None,
) -> list[PairScore]:
    """The pairs to keep, in manifest order: score >= `min_score`, and among the best
    `keep_count` pairs or the best `keep_fraction` of them (rounded half up), where given.

    Ties at the cut are broken by manifest order. At most one of `keep_count` and `keep_fraction`.
    """
    if keep_count is not None and keep_fraction is not None:
        raise ValueError("give keep_count or keep_fraction, not both")
    if keep_count is not None and (isinstance(keep_count, bool) or not isinstance(keep_count, int) or keep_count < 0):
        raise ValueError(f"keep_count must be a non-negative integer, got {keep_count!r}")
    if keep_fraction is not None and not 0 <= keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be between 0 and 1, got {keep_fraction!r}")
    if min_score is not None and not math.isfinite(min_score):
        raise ValueError(f"min_score must be a finite number, got {min_score!r}")
    keep = list(range(len(pairs)))
    if keep_count is not None or keep_fraction is not None:
        n = keep_count if keep_count is not None else int(keep_fraction * len(pairs) + 0.5)  # type: ignore[operator]
        keep = sorted(sorted(keep, key=lambda i: -pairs[i].score)[:n])
    return [pairs[i] for i in keep if min_score is None or pairs[i].score >= min_score]


def parse_keep_top(text: str) -> tuple[int | None, float | None]:
    """`--keep-top`: "4000" is a count of pairs, "80%" a share of them; returns (count, fraction)."""
    text = text.strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return None, percent / 100
        count = int(text)
        if count < 0:
            raise ValueError
        return count, None
    except ValueError:
        raise ValueError(f"keep-top is a count of pairs (4000) or a percentage (80%), got {text!r}") from None


def filtered_entries(entries: Sequence[ManifestEntry], kept: Sequence[PairScore]) -> list[ManifestEntry]:
    """The entries with only their kept captions; an entry left with none is dropped."""
    captions: dict[int, list[str]] = {}
    for pair in sorted(kept, key=lambda p: (p.entry, p.caption_index)):
        captions.setdefault(pair.entry, []).append(pair.caption)
    return [replace(entry, captions=captions[i]) for i, entry in enumerate(entries) if i in captions]


def write_manifest(entries: Sequence[ManifestEntry], path: str | Path) -> None:
    """A captions.jsonl of `entries`, image paths rewritten relative to the new file's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    with path.open("w", encoding="utf-8") as out:
        for entry in entries:
            image = os.path.relpath(Path(entry.image).resolve(), folder)
            out.write(json.dumps({"image": image, "captions": entry.captions, **entry.metadata}, ensure_ascii=False) + "\n")


def near_duplicate_vectors(
    encoder: Encoder,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Unit embeddings of the photos shrunk to NEAR_DUP_SIDE px on their short side, for `duplicate_groups`.

    Why shrink: towers are sensitive to sharpness, so a photo's own embedding does not find its
    resized copies. The default tower puts a half-size copy of a Flickr8k photo at cosine 0.45
    from the original, far below unrelated photos. Shrunk to a common 48 px, re-encoded copies
    score 0.99 or more, half-size copies 0.947 or more (median 0.986), and the closest two
    different photos of Flickr8k dev and coco_mini 0.873 (docs/curation.md).
    """
    workers = default_workers() if workers is None else workers
    shrink = partial(_shrunk_pixels, config=encoder.preprocess, side=NEAR_DUP_SIDE)
    vectors, batch = [], []
    with tqdm(total=len(paths), unit="img", desc="near-duplicate embedding", disable=not progress) as bar:
        for pixels in bounded_map(shrink, paths, workers, window=2 * batch_size):
            batch.append(pixels)
            if len(batch) == batch_size:
                vectors.append(encoder.embed_pixels(np.stack(batch)))
                bar.update(len(batch))
                batch = []
        if batch:
            vectors.append(encoder.embed_pixels(np.stack(batch)))
            bar.update(len(batch))
    return np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float32)


def _shrunk_pixels(path: str | Path, config: PreprocessConfig, side: int) -> np.ndarray:
    """The decode stage of `near_duplicate_vectors`, run in a worker: shrink, then the tower's resize."""
    image = load_image(path)
    scale = side / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return prepare_pixels(image, config)


def duplicate_groups(paths: Sequence[str | Path], vectors: np.ndarray, near_threshold: float = 0.95) -> Duplicates:
    """Exact duplicates by content hash, and near duplicates by image-embedding cosine.

    `vectors` are unit embeddings, one row per path: `near_duplicate_vectors` (which finds
    resized copies), or any others. Near pairs are found by a blocked all-pairs comparison (n^2
    dot products). The default threshold was measured for the default tower (docs/curation.md).
    """
    if not -1 <= near_threshold <= 1:
        raise ValueError(f"near_threshold is a cosine, between -1 and 1; got {near_threshold!r}")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape[0] != len(paths):
        raise ValueError(f"{len(paths)} paths but {vectors.shape[0]} vectors")
    rows: dict[str, int] = {}
    for i, path in enumerate(paths):
        rows.setdefault(str(path), i)  # a path listed twice counts once
    by_hash: dict[str, list[str]] = {}
    for path in rows:
        by_hash.setdefault(content_hash(read_bytes(path)), []).append(path)
    exact = [group for group in by_hash.values() if len(group) > 1]
    firsts = [group[0] for group in by_hash.values()]
    near = [[firsts[i] for i in group] for group in _linked(vectors[[rows[p] for p in firsts]], near_threshold)]
    return Duplicates(exact, near, near_threshold)


def _linked(vectors: np.ndarray, threshold: float, block: int = 1024) -> list[list[int]]:
    """Groups (2+) of rows joined by any chain of pairs with dot product >= threshold (union-find)."""
    parent = list(range(len(vectors)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(vectors), block):
        sims = vectors[start : start + block] @ vectors.T
        for a, b in zip(*np.nonzero(sims >= threshold)):
            i, j = start + int(a), int(b)
            if i < j:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(vectors)):
        groups.setdefault(root(i), []).append(i)
    return [group for group in groups.values() if len(group) > 1]


def shuffle_captions(entries: Sequence[ManifestEntry], fraction: float, seed: int = 0) -> tuple[list[ManifestEntry], list[bool]]:
    """Entries with the captions of `fraction` of the captioned images moved to another of them.

    For measuring a pair score: the moved captions are known wrong pairs. The chosen images
    pass their caption lists on in a cycle, so none keeps its own. Returns the entries and,
    per entry, whether its captions are now wrong.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction!r}")
    captioned = [i for i, e in enumerate(entries) if e.captions]
    chosen = np.random.default_rng(seed).permutation(captioned)[: int(fraction * len(captioned) + 0.5)]
    if len(chosen) == 1:
        raise ValueError("shuffling needs at least two images to trade captions")
    out, moved = list(entries), [False] * len(entries)
    for giver, taker in zip(chosen, np.roll(chosen, 1)):
        out[taker] = replace(entries[taker], captions=list(entries[giver].captions))
        moved[taker] = True
    return out, moved


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """ROC AUC of `scores` for telling `positive` items from the rest, by ranks (Mann-Whitney U):
    the chance a positive outscores a negative, ties half. Equals scikit-learn's `roc_auc_score`
    (tested) without needing it."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        raise ValueError("ROC AUC needs both positive and negative items")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct value, ties averaged
    return float((mean_rank[inverse][positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
