"""Zero-shot labels from prompt templates, and the average precision that scores them.

A label becomes one vector the CLIP way: fill every template with the label, embed the texts,
average the unit vectors and normalise again. Averaging over phrasings removes much of one
prompt's wording luck. Images are then scored against labels by dot product. Multi-label truth
(a COCO photo holds several categories) is scored by average precision per label, over images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .encoders import Encoder

#: CLIP-style prompt templates; "{}" is replaced by the label. Kept short: each costs one text per label.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of many {}.",
)


def check_labels(labels: Sequence[str]) -> list[str]:
    """Labels must be distinct non-empty strings: a duplicate would silently split its score."""
    labels = list(labels)
    if not labels:
        raise ValueError("no labels given: zero-shot needs at least one label")
    seen: set[str] = set()
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"label {i} is empty or not a string: {label!r}")
        if label in seen:
            raise ValueError(f"label {label!r} is given twice")
        seen.add(label)
    return labels


def check_templates(templates: Sequence[str] | None) -> list[str]:
    """Templates must each hold "{}" (where the label goes) and be distinct; None means the defaults."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        raise TypeError("templates must be a list of strings, not one string")
    templates = list(templates)
    if not templates:
        raise ValueError("no templates given: pass None for the defaults")
    for i, template in enumerate(templates):
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"template {i} has no '{{}}' for the label: {template!r}")
    if len(set(templates)) != len(templates):
        raise ValueError("a template is given twice")
    return templates


def read_templates(path: str | Path) -> list[str]:
    """Templates from a text file, one a line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return check_templates([line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")])


def label_vectors(encoder: Encoder, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
    """(n_labels, dim) unit vectors: each the renormalised mean of the label's filled templates."""
    labels, templates = check_labels(labels), check_templates(templates)
    texts = [template.replace("{}", label) for label in labels for template in templates]
    vectors = encoder.embed_texts(texts, batch_size=128).reshape(len(labels), len(templates), -1)
    mean = vectors.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Non-interpolated AP of one ranking: sum over score thresholds of (recall step) x precision.

    Tied scores form one threshold (as scikit-learn scores them), so the result does not depend
    on how a sort orders ties. Needs at least one relevant item.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    relevant = np.asarray(relevant, dtype=bool).ravel()
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinity")
    if not relevant.any():
        raise ValueError("no relevant item: average precision is undefined")
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], np.cumsum(relevant[order])
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = hits[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_step = np.diff(np.r_[0, true_pos]) / true_pos[-1]
    return float((recall_step * precision).sum())


def mean_average_precision(score_matrix: np.ndarray, truth_matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """Per-class AP over images (columns are classes), and their mean over classes with a positive.

    Returns (mAP, per-class AP); a class with no positive image gets NaN and stays out of the mean
    (its AP is undefined, not zero). mAP is NaN when no class has a positive.
    """
    score_matrix = np.asarray(score_matrix, dtype=np.float64)
    truth_matrix = np.asarray(truth_matrix, dtype=bool)
    if score_matrix.ndim != 2 or score_matrix.shape != truth_matrix.shape:
        raise ValueError(f"expected two equal (images, classes) matrices, got {score_matrix.shape} and {truth_matrix.shape}")
    per_class = np.full(score_matrix.shape[1], np.nan)
    for c in np.flatnonzero(truth_matrix.any(axis=0)):
        per_class[c] = average_precision(score_matrix[:, c], truth_matrix[:, c])
    scored = per_class[~np.isnan(per_class)]
    return (float(scored.mean()) if scored.size else float("nan")), per_class
