"""Ingest: items -> decode (worker processes) -> encode (batched) -> write (batched upserts).

Decoding and resizing run in forked worker processes that use PIL only, overlapping the
encoder's forward pass in this process. At most `window` items are in flight, so memory stays
bounded whatever the corpus size.

Ids are deterministic: an image file's id comes from its absolute path, an in-memory image's
from its pixels or bytes, a text's from the text. Each batch reads back what the store holds
for its ids before encoding: an item whose stored payload (content hash, captions, metadata)
is unchanged is skipped, a changed one is re-encoded and overwritten. So re-running an
interrupted or repeated ingest encodes only what is missing or changed: that is the resume
checkpoint, and a photo replaced on disk replaces its old version in the index.

`mmrag.ray_ingest` runs the same steps (`prepare_item`, `unstored`, `encode_prepared`,
`write_points`) on Ray actors, so both paths build the same points.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from .encoders import Encoder, PreprocessConfig, prepare_pixels
from .media import ImageDecodeError, MAX_PIXELS, content_hash, decode_bytes, load_image, pixel_hash, read_bytes
from .sources import DERIVED_KEYS, Item
from .store import Point, Store

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Skipped:
    """An input that was not indexed, and why."""

    item: str
    reason: str


@dataclass
class IngestReport:
    """What one `add` did: counts, every skipped input with its reason, and time per stage."""

    added: int = 0
    updated: int = 0
    already_present: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    #: items with a text or caption longer than the tower's context, embedded truncated
    truncated: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"decode_wait": 0.0, "encode": 0.0, "write": 0.0})

    def __str__(self) -> str:
        lines = [f"added {self.added}, updated {self.updated}, already present {self.already_present}, "
                 f"skipped {len(self.skipped)} in {self.seconds:.1f} s"]
        lines += [f"  skipped {s.item}: {s.reason}" for s in self.skipped]
        lines += [f"  truncated to the tower's context: {item}" for item in self.truncated]
        return "\n".join(lines)


@dataclass
class Prepared:
    """An item after the decode stage: its id, content hash and pixels, or why it failed."""

    item: Item
    id: str = ""
    content_hash: str = ""
    pixels: np.ndarray | None = None
    error: str | None = None

    @property
    def payload(self) -> dict[str, Any]:
        """What the store keeps beside the vectors; an equal stored payload means nothing changed."""
        item = self.item
        payload: dict[str, Any] = dict(item.metadata)
        payload.update(
            uri=item.uri,
            captions=[c for c in item.captions if c.strip()],
            content_hash=self.content_hash,
            modality="text" if item.image is None else "image",
        )
        if item.text is not None:
            payload["text"] = item.text
        return payload


def point_id(digest: str) -> str:
    """A UUID string from a hex digest: Qdrant accepts it, and it is stable across runs."""
    return str(uuid.UUID(hex=digest[:32]))


def text_hash(text: str) -> str:
    return content_hash(b"text\0" + text.encode("utf-8"))


def file_id(item: Item) -> str | None:
    """An image file's id, known from its path before the file is read; None for other items."""
    if item.uri is not None and isinstance(item.image, (os.PathLike, str)):
        return point_id(content_hash(b"file\0" + item.uri.encode("utf-8")))
    return None


def item_id(item: Item, digest: str) -> str:
    """A file's identity is its path (so a replaced photo replaces its point); else its content."""
    return file_id(item) or point_id(digest)


def prepare_item(item: Item, config: PreprocessConfig, max_pixels: int = MAX_PIXELS,
                 allow_truncated: bool = False) -> Prepared:
    """The decode stage, run in a worker: read, hash, decode, resize. Never raises on bad input."""
    if item.image is None:
        if item.text is None or not item.text.strip():
            return Prepared(item, error="empty text: nothing to embed")
        digest = text_hash(item.text)
        return Prepared(item, id=item_id(item, digest), content_hash=digest)
    try:
        if isinstance(item.image, (bytes, os.PathLike, str)):
            data = item.image if isinstance(item.image, bytes) else read_bytes(item.image)
            digest, image = content_hash(data), decode_bytes(data, max_pixels, allow_truncated)
        else:
            image = load_image(item.image, max_pixels)
            digest = pixel_hash(image)
        return Prepared(item, id=item_id(item, digest), content_hash=digest, pixels=prepare_pixels(image, config))
    except ImageDecodeError as exc:
        return Prepared(item, error=str(exc))


def bounded_map(fn: Callable[[T], R], inputs: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """`map(fn, inputs)` in worker processes, in order, with at most `window` inputs in flight."""
    if workers <= 0:
        yield from map(fn, inputs)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque = deque()
        for value in inputs:
            pending.append(pool.submit(fn, value))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_workers() -> int:
    """One decode worker per two cores: the encoder's intra-op threads need the rest."""
    return max(1, (os.cpu_count() or 2) // 2)


def ingest(
    items: Iterable[Item],
    encoder: Encoder,
    store: Store,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    total: int | None = None,
    allow_truncated: bool = False,
) -> IngestReport:
    """Index `items` into `store` with `encoder`; bad inputs are skipped and reported, never raised.

    `allow_truncated` indexes truncated image files (their missing part grey) instead of
    skipping them.
    """
    workers = default_workers() if workers is None else workers
    report = IngestReport()
    started = time.perf_counter()
    prepare = partial(prepare_item, config=encoder.preprocess, allow_truncated=allow_truncated)
    prepared = bounded_map(prepare, items, workers, window=max(2 * batch_size, 4 * workers))
    batch: list[Prepared] = []
    with tqdm(total=total, unit="item", desc="indexing", disable=not progress) as bar:
        while True:
            waited = time.perf_counter()
            result = next(prepared, None)
            report.stage_seconds["decode_wait"] += time.perf_counter() - waited
            if result is not None:
                if result.error:
                    report.skipped.append(Skipped(result.item.label, result.error))
                    logger.info("skipped %s: %s", result.item.label, result.error)
                    bar.update(1)
                else:
                    batch.append(result)
            if batch and (len(batch) >= batch_size or result is None):
                _write_batch(batch, encoder, store, report)
                bar.update(len(batch))
                batch = []
            if result is None:
                break
    store.flush()
    report.seconds = time.perf_counter() - started
    return report


def _write_batch(batch: list[Prepared], encoder: Encoder, store: Store, report: IngestReport) -> None:
    """Encode what the store lacks or holds in another version, then upsert it as one request."""
    stored = stored_payloads(store, [p.id for p in batch])
    fresh = unstored(batch, stored, report)
    if not fresh:
        return
    started = time.perf_counter()
    points = encode_prepared(fresh, encoder, report)
    report.stage_seconds["encode"] += time.perf_counter() - started
    write_points(points, stored, store, report)


#: What change detection compares: a decoded item before encoding, or an encoded point before writing.
Entry = TypeVar("Entry", Prepared, Point)


def stored_payloads(store: Store, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The payloads the store holds for `ids`, by id; ids it lacks are left out."""
    return {hit.id: hit.payload for hit in store.retrieve(list(set(ids)))}


def unstored(entries: list[Entry], stored: dict[str, dict[str, Any]], report: IngestReport) -> list[Entry]:
    """The first entry of each id the store lacks or holds with another payload; the rest count as present.

    Keys written after ingest (DERIVED_KEYS: tags) are left out of the comparison, so tagging does
    not make every item look changed; a changed item is rewritten whole, dropping its stale tags.
    """
    fresh: dict[str, Entry] = {}
    for entry in entries:
        if entry.id in fresh or _ingested_part(stored.get(entry.id)) == entry.payload:
            report.already_present += 1
        else:
            fresh[entry.id] = entry
    return list(fresh.values())


def _ingested_part(payload: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored payload without the keys added after ingest."""
    return None if payload is None else {k: v for k, v in payload.items() if k not in DERIVED_KEYS}


def write_points(points: list[Point], stored: dict[str, dict[str, Any]], store: Store, report: IngestReport) -> None:
    """Upsert `points` in one request; an id that was in `stored` counts as updated, others as added."""
    if not points:
        return
    started = time.perf_counter()
    store.upsert(points)
    report.stage_seconds["write"] += time.perf_counter() - started
    replaced = sum(point.id in stored for point in points)
    report.updated += replaced
    report.added += len(points) - replaced


def encode_prepared(batch: list[Prepared], encoder: Encoder, report: IngestReport) -> list[Point]:
    """Image vectors from pixels; text vectors from a text item, or the mean of an image's captions."""
    images = [p for p in batch if p.pixels is not None]
    image_vectors = dict(zip((p.id for p in images), encoder.embed_pixels(np.stack([p.pixels for p in images])))) if images else {}
    texts_of = {p.id: _texts(p.item) for p in batch}
    flat = [text for texts in texts_of.values() for text in texts]
    _note_truncation(batch, texts_of, encoder.count_tokens(flat) if flat else [], encoder.context_length, report)
    flat_vectors = iter(encoder.embed_texts(flat)) if flat else iter(())
    points = []
    for prepared in batch:
        vectors: dict[str, np.ndarray] = {}
        if prepared.id in image_vectors:
            vectors["image"] = image_vectors[prepared.id]
        texts = texts_of[prepared.id]
        if texts:
            vectors["text"] = _mean_direction(np.stack([next(flat_vectors) for _ in texts]))
        if not vectors or not all(np.isfinite(v).all() and np.linalg.norm(v) > 0 for v in vectors.values()):
            report.skipped.append(Skipped(prepared.item.label, "encoder produced a zero or non-finite vector"))
            continue
        points.append(Point(id=prepared.id, vectors=vectors, payload=prepared.payload))
    return points


def _note_truncation(batch: list[Prepared], texts_of: dict[str, list[str]], counts: list[int], context: int,
                     report: IngestReport) -> None:
    """Record items whose texts exceed the tower's context: they are embedded truncated.

    `counts` are the token counts of every text of the batch, in `texts_of` order (one tokenizer call).
    """
    remaining = iter(counts)
    for prepared in batch:
        texts = texts_of[prepared.id]
        if texts and max(next(remaining) for _ in texts) > context:
            report.truncated.append(prepared.item.label)


def _texts(item: Item) -> list[str]:
    """The non-empty texts to embed for an item; an empty caption leaves an image-only item."""
    if item.text is not None:
        return [item.text]
    return [caption for caption in item.captions if caption.strip()]


def _mean_direction(vectors: np.ndarray) -> np.ndarray:
    """Several caption embeddings pooled into one unit vector (their mean direction)."""
    mean = vectors.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
