"""Retrieval evaluation on a captions manifest: recall@1/5/10, text-to-image and image-to-text.

Scored the standard (Flickr/COCO) way: each caption is one query and finds its own image;
an image finds its text if any of its captions ranks in the top k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .encoders import Encoder
from .encoders.metrics import retrieval_recall
from .ingest import bounded_map, default_workers, prepare_item
from .sources import Item, read_manifest


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
        raise ValueError(f"{manifest} has no captioned images" + (f" in split {split!r}" if split else ""))
    image_vectors = _embed_images(encoder, [e.image for e in entries], batch_size, workers, progress)
    captions = [c for e in entries for c in e.captions]
    text_to_image = np.repeat(np.arange(len(entries)), [len(e.captions) for e in entries])
    text_vectors = encoder.embed_texts(captions, batch_size=128)
    recall = retrieval_recall(image_vectors, text_vectors, text_to_image)
    return RetrievalReport(str(manifest), split, encoder.spec, len(entries), len(captions), recall)


def _embed_images(encoder: Encoder, paths: list[Path], batch_size: int, workers: int | None, progress: bool) -> np.ndarray:
    """Decode in worker processes, embed in batches; any unreadable image is an error here."""
    workers = default_workers() if workers is None else workers
    prepare = partial(prepare_item, config=encoder.preprocess)
    items = (Item(uri=str(p), image=p) for p in paths)
    vectors, pixels = [], []
    with tqdm(total=len(paths), unit="img", desc="embedding images", disable=not progress) as bar:
        for prepared in bounded_map(prepare, items, workers, window=2 * batch_size):
            if prepared.error:
                raise ValueError(f"cannot evaluate: {prepared.item.label}: {prepared.error}")
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
