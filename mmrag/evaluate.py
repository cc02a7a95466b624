"""Evaluation on a captions manifest: retrieval recall and zero-shot classification mAP.

Retrieval is scored the standard (Flickr/COCO) way: each caption is one query and finds its own
image; an image finds its text if any of its captions ranks in the top k. Zero-shot scores every
image against every label (from the manifest's `categories`) through prompt templates, and
reports average precision per label, since a photo may hold several categories.

Both start from the same image vectors: `evaluate_manifest` embeds each image once and scores
both from them; `evaluate_retrieval` and `evaluate_zero_shot` are the one-figure shortcuts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .encoders import Encoder
from .encoders.metrics import retrieval_recall
from .ingest import bounded_map, default_workers, prepare_item
from .sources import Item, ManifestEntry, read_manifest
from .zeroshot import check_templates, label_vectors, mean_average_precision


@dataclass(frozen=True)
class RetrievalReport:
    """Recall figures (fractions in 0..1) with what they were measured on."""

    manifest: str
    split: str | None
    encoder_spec: str
    images: int
    captions: int
    recall: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ZeroShotReport:
    """Zero-shot mAP (fraction in 0..1) over labels, with what it was measured on.

    `chance` is the mAP a random ranking scores on average: the mean share of images holding
    each scored label. Labels with no positive image have no AP and are listed apart.
    """

    manifest: str
    split: str | None
    encoder_spec: str
    images: int
    labels: int
    mAP: float
    chance: float
    per_label_ap: dict[str, float]
    labels_without_positives: list[str]
    templates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    """What `mmrag eval` prints: either part is None when the manifest cannot give it."""

    retrieval: RetrievalReport | None
    zero_shot: ZeroShotReport | None

    def to_dict(self) -> dict:
        return {"retrieval": self.retrieval and self.retrieval.to_dict(),
                "zero_shot": self.zero_shot and self.zero_shot.to_dict()}


def has_categories(entry: ManifestEntry) -> bool:
    """An entry takes part in zero-shot only when its line says which categories it holds."""
    return "categories" in entry.metadata


def evaluate_manifest(
    encoder: Encoder,
    manifest: str | Path,
    *,
    split: str | None = None,
    zero_shot: bool | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> EvalReport:
    """Retrieval recall and (when `zero_shot`, or when None and the manifest has categories) mAP.

    Every image is embedded once, for both evaluations.
    """
    entries = read_manifest(manifest, split=split)
    captioned = [e for e in entries if e.captions]
    labelled = [e for e in entries if has_categories(e)]
    zero_shot = bool(labelled) if zero_shot is None else zero_shot
    if zero_shot and not labelled:
        raise ValueError(f"{manifest} has no entries with 'categories'" + in_split(split) + ": zero-shot needs them")
    if not captioned and not zero_shot:
        raise ValueError(f"{manifest} has no captioned images" + in_split(split))
    templates = check_templates(templates) if zero_shot else None  # fail before the slow embedding
    used = list(dict.fromkeys(e.image for e in captioned + (labelled if zero_shot else [])))
    vectors = embed_image_files(encoder, used, batch_size, workers, progress)
    row = {image: i for i, image in enumerate(used)}

    def rows(subset: list[ManifestEntry]) -> np.ndarray:
        return vectors[[row[e.image] for e in subset]]

    retrieval = retrieval_from_vectors(encoder, captioned, rows(captioned), str(manifest), split) if captioned else None
    shot = zero_shot_from_vectors(encoder, labelled, rows(labelled), str(manifest), split, templates) if zero_shot else None
    return EvalReport(retrieval, shot)


def evaluate_retrieval(
    encoder: Encoder,
    manifest: str | Path,
    *,
    split: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> RetrievalReport:
    """Embed every image and caption of `manifest` (optionally one `split`) and score recall."""
    entries = [e for e in read_manifest(manifest, split=split) if e.captions]
    if not entries:
        raise ValueError(f"{manifest} has no captioned images" + in_split(split))
    image_vectors = embed_image_files(encoder, [e.image for e in entries], batch_size, workers, progress)
    return retrieval_from_vectors(encoder, entries, image_vectors, str(manifest), split)


def evaluate_zero_shot(
    encoder: Encoder,
    manifest: str | Path,
    *,
    split: str | None = None,
    templates: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> ZeroShotReport:
    """Zero-shot mAP of the entries of `manifest` that list `categories`, against `labels`.

    `labels` defaults to every category the entries name; `templates` to DEFAULT_TEMPLATES.
    """
    entries = [e for e in read_manifest(manifest, split=split) if has_categories(e)]
    if not entries:
        raise ValueError(f"{manifest} has no entries with 'categories'" + in_split(split))
    templates = check_templates(templates)
    image_vectors = embed_image_files(encoder, [e.image for e in entries], batch_size, workers, progress)
    return zero_shot_from_vectors(encoder, entries, image_vectors, str(manifest), split, templates, labels)


def retrieval_from_vectors(
    encoder: Encoder, entries: list[ManifestEntry], image_vectors: np.ndarray, manifest: str, split: str | None
) -> RetrievalReport:
    """Recall from precomputed image vectors (one row per entry); embeds only the captions."""
    captions = [c for e in entries for c in e.captions]
    text_to_image = np.repeat(np.arange(len(entries)), [len(e.captions) for e in entries])
    text_vectors = encoder.embed_texts(captions, batch_size=128)
    recall = retrieval_recall(image_vectors, text_vectors, text_to_image)
    return RetrievalReport(manifest, split, encoder.spec, len(entries), len(captions), recall)


def zero_shot_from_vectors(
    encoder: Encoder,
    entries: list[ManifestEntry],
    image_vectors: np.ndarray,
    manifest: str,
    split: str | None,
    templates: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
) -> ZeroShotReport:
    """mAP from precomputed image vectors (one row per entry); embeds only the label prompts."""
    truth_sets = [set(e.categories) for e in entries]
    labels = sorted(set().union(*truth_sets)) if labels is None else list(labels)
    templates = check_templates(templates)
    scores = image_vectors @ label_vectors(encoder, labels, templates).T  # (images, labels)
    truth = np.array([[label in held for label in labels] for held in truth_sets], dtype=bool).reshape(len(entries), len(labels))
    mAP, per_label = mean_average_precision(scores, truth)
    scored = truth.any(axis=0)
    return ZeroShotReport(
        manifest, split, encoder.spec, len(entries), len(labels), mAP,
        chance=float(truth[:, scored].mean(axis=0).mean()) if scored.any() else float("nan"),
        per_label_ap={label: float(ap) for label, ap, ok in zip(labels, per_label, scored) if ok},
        labels_without_positives=[label for label, ok in zip(labels, scored) if not ok],
        templates=list(templates),
    )


def in_split(split: str | None) -> str:
    """The ` in split 'dev'` part of an error message; empty when no split was asked for."""
    return f" in split {split!r}" if split else ""


def embed_image_files(encoder: Encoder, paths: list[Path], batch_size: int, workers: int | None, progress: bool) -> np.ndarray:
    """Decode in worker processes, embed in batches; any unreadable image is an error here."""
    workers = default_workers() if workers is None else workers
    prepare = partial(prepare_item, config=encoder.preprocess)
    items = (Item(uri=str(p), image=p) for p in paths)
    vectors, pixels = [], []
    with tqdm(total=len(paths), unit="img", desc="embedding images", disable=not progress) as bar:
        for prepared in bounded_map(prepare, items, workers, window=2 * batch_size):
            if prepared.error:
                raise ValueError(f"cannot embed {prepared.item.label}: {prepared.error}")
            pixels.append(prepared.pixels)
            if len(pixels) == batch_size:
                vectors.append(encoder.embed_pixels(np.stack(pixels)))
                bar.update(len(pixels))
                pixels = []
        if pixels:
            vectors.append(encoder.embed_pixels(np.stack(pixels)))
            bar.update(len(pixels))
    return np.concatenate(vectors)


def format_table(report: RetrievalReport) -> str:
    """A plain-text table people can read at a glance."""
    r = report.recall
    rows = [
        f"{report.encoder_spec} on {report.manifest}" + (f" [{report.split}]" if report.split else ""),
        f"{report.images} images, {report.captions} captions",
        f"{'':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}",
        f"{'text -> image':<16}" + "".join(f"{100 * r[f't2i_r{k}']:>7.1f}%" for k in (1, 5, 10)),
        f"{'image -> text':<16}" + "".join(f"{100 * r[f'i2t_r{k}']:>7.1f}%" for k in (1, 5, 10)),
    ]
    return "\n".join(rows)


def format_zero_shot_table(report: ZeroShotReport, show: int = 5) -> str:
    """mAP against chance, then the `show` best and worst labels, as plain text."""
    ranked = sorted(report.per_label_ap.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [
        f"zero-shot: {report.images} images, {report.labels} labels, {len(report.templates)} templates",
        f"{'mAP':<16}{100 * report.mAP:>7.1f}%   (chance {100 * report.chance:.1f}%)",
        f"{'best':<16}" + ", ".join(f"{label} {100 * ap:.0f}%" for label, ap in ranked[:show]),
        f"{'worst':<16}" + ", ".join(f"{label} {100 * ap:.0f}%" for label, ap in ranked[::-1][:show]),
    ]
    if report.labels_without_positives:
        rows.append(f"{len(report.labels_without_positives)} labels without a positive image (not scored): "
                    + ", ".join(report.labels_without_positives))
    return "\n".join(rows)


def format_eval_table(report: EvalReport) -> str:
    """Both parts of `mmrag eval`, retrieval first, separated by a blank line."""
    parts = [format_table(report.retrieval)] if report.retrieval else []
    if report.zero_shot:
        z = report.zero_shot
        title = "" if report.retrieval else f"{z.encoder_spec} on {z.manifest}" + (f" [{z.split}]" if z.split else "") + "\n"
        parts.append(title + format_zero_shot_table(z))
    return "\n\n".join(parts)
