"""Sources: everything `Index.add` accepts, turned into one stream of `Item`s.

Accepted sources:
- a folder, walked recursively for image files; if it holds a `captions.jsonl` manifest at its
  top, captions and metadata from it are attached to the matching images;
- a `captions.jsonl` manifest (one JSON object a line: `image` relative to the manifest,
  `captions`, and any other keys as metadata);
- one image file;
- a list mixing image paths, PIL images, numpy arrays, encoded bytes and texts.

How a string in a list is read: a string ending in an image suffix (`.jpg`, `.png`, ...) is a
path to an image (reported as "file not found" if missing); any other string is a text item.
A `pathlib.Path` is always a path. Paths may start with `~`. A lone string that starts like a
path (`/`, `~`, `./`, `../`) but names nothing raises FileNotFoundError instead of becoming a
text item; pass `[text]` to index such a string as text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from .media import IMAGE_SUFFIXES

#: Payload keys written after ingest, by `mmrag.tagging`; ingest's change detection ignores them.
DERIVED_KEYS = frozenset({"tags", "tag_scores"})
#: Payload keys mmrag writes itself; user metadata may not use them.
RESERVED_KEYS = frozenset({"uri", "captions", "content_hash", "modality", "text"}) | DERIVED_KEYS

#: A lone string starting like this is meant as a path: if nothing is there, `Index.add` raises
#: instead of storing the path as a text item.
PATH_PREFIXES = ("/", "~", "./", "../")

Source = Union[str, Path, Image.Image, np.ndarray, bytes, Sequence[Any]]


@dataclass
class Item:
    """One thing to index: an image (path, bytes, PIL or array), its captions, or a text alone."""

    uri: str | None = None
    image: Path | bytes | Image.Image | np.ndarray | None = None
    captions: list[str] = field(default_factory=list)
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How reports name this item."""
        if self.uri:
            return self.uri
        if self.text is not None:
            return f"text {self.text[:40]!r}"
        return f"<{type(self.image).__name__}>"


@dataclass(frozen=True)
class ManifestEntry:
    """One line of a captions.jsonl manifest, with the image path resolved."""

    image: Path
    captions: list[str]
    metadata: dict[str, Any]

    @property
    def categories(self) -> list[str]:
        """The line's `categories` (kept in metadata, so the index payload has them); [] if absent."""
        value = self.metadata.get("categories") or []
        return [value] if isinstance(value, str) else [str(c) for c in value]


def read_manifest(path: str | Path, split: str | None = None) -> list[ManifestEntry]:
    """Read a captions.jsonl manifest; image paths are relative to the manifest's folder."""
    path = Path(path).expanduser()
    root = path.parent
    entries = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image = record.pop("image")
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{path}:{number}: not a manifest line with an 'image' key ({exc})") from None
            captions = record.pop("captions", [])
            if isinstance(captions, str):
                captions = [captions]
            if split is not None and record.get("split") != split:
                continue
            entries.append(ManifestEntry(root / image, list(captions), _check_metadata(record, f"{path}:{number}")))
    return entries


def iter_items(source: Source) -> Iterator[Item]:
    """Yield the items of any accepted source, lazily where the source allows."""
    if isinstance(source, (str, Path)) and not _is_text(source):
        path = Path(source).expanduser()
        if path.is_dir():
            yield from _folder_items(path)
        elif path.suffix == ".jsonl":
            yield from (_entry_item(entry) for entry in read_manifest(path))
        else:
            yield file_item(path)
        return
    if isinstance(source, str) and source.startswith(PATH_PREFIXES):
        raise FileNotFoundError(f"no such folder, image or manifest: {source!r}. To index this string as a text item, "
                                f"pass it in a list: add([{source!r}])")
    if isinstance(source, (str, Image.Image, np.ndarray, bytes)):
        source = [source]
    if not isinstance(source, Iterable):
        raise TypeError(f"cannot index a {type(source).__name__}; see mmrag.sources for accepted sources")
    for element in source:
        yield _element_item(element)


def captioned_pairs(source: Source, split: str | None = None) -> list[tuple[Path, list[str]]]:
    """(image path, captions) for every captioned image file of `source`, optionally one `split`.

    What training and evaluation read: the same folders and manifests `Index.add` takes;
    images without captions are left out (nothing to pair them with).
    """
    pairs = []
    for item in iter_items(source):
        if not item.captions or not isinstance(item.image, Path):
            continue
        if split is not None and item.metadata.get("split") != split:
            continue
        pairs.append((item.image, list(item.captions)))
    return pairs


def count_items(source: Source) -> int | None:
    """How many items a source holds, when that is cheap to know (for the progress bar)."""
    if isinstance(source, (list, tuple)):
        return len(source)
    if isinstance(source, (str, Path)) and not _is_text(source):
        folder = Path(source).expanduser()
        return len(list_images(folder)) if folder.is_dir() else None
    return None


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, in a stable (sorted) order; hidden files skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return found


def _folder_items(folder: Path) -> Iterator[Item]:
    manifest = folder / "captions.jsonl"
    described = {e.image.resolve(): e for e in read_manifest(manifest)} if manifest.is_file() else {}
    for path in list_images(folder):
        entry = described.get(path.resolve())
        if entry is not None:
            yield _entry_item(entry)
        else:
            yield file_item(path)


def file_item(path: Path, captions: list[str] | None = None, metadata: dict[str, Any] | None = None) -> Item:
    """An image file item; its uri is the absolute path, which is also its identity in the index."""
    return Item(uri=os.path.abspath(path), image=Path(path), captions=captions or [], metadata=metadata or {})


def _entry_item(entry: ManifestEntry) -> Item:
    return file_item(entry.image, entry.captions, entry.metadata)


def _element_item(element: Any) -> Item:
    if isinstance(element, Item):
        return element
    if isinstance(element, Path) or (isinstance(element, str) and not _is_text(element)):
        return file_item(Path(element).expanduser())
    if isinstance(element, str):
        return Item(text=element)
    if isinstance(element, (Image.Image, np.ndarray, bytes, bytearray)):
        return Item(image=bytes(element) if isinstance(element, bytearray) else element)
    raise TypeError(f"cannot index a {type(element).__name__}: expected a path, text, PIL image, array or bytes")


def _is_text(value: str | Path) -> bool:
    """A str is a path when it names an image file, an existing folder or a .jsonl manifest (`~` expanded)."""
    if isinstance(value, Path):
        return False
    suffix = Path(value).suffix.lower() if len(value) < 4096 and "\n" not in value else ""
    if suffix in IMAGE_SUFFIXES or suffix == ".jsonl":
        return False
    return not (len(value) < 4096 and os.path.isdir(os.path.expanduser(value)))


def _check_metadata(metadata: dict[str, Any], where: str) -> dict[str, Any]:
    clash = RESERVED_KEYS & metadata.keys()
    if clash:
        raise ValueError(f"{where}: metadata keys {sorted(clash)} are reserved by mmrag; rename them")
    return metadata
