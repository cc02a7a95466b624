"""Image files of indexed items: which file an item's image is, its cached thumbnail, and uploads.

Only a file an item of the index points to is ever opened: the path comes from the item's stored
payload (`uri`, written at indexing time), never from the request, so no URL can reach another file.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from ..media import ImageDecodeError, MAX_PIXELS, content_hash, load_image

#: Longest side of a thumbnail, in pixels.
THUMBNAIL_SIZE = 256

#: Image file suffix -> the Content-Type it is served with.
MEDIA_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
    ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
}
#: PIL format of an upload -> the suffix it is stored with; other formats are refused.
UPLOAD_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def image_file(payload: dict[str, Any]) -> Path | None:
    """The local image file an item was indexed from; None for text items, URLs and non-image paths."""
    uri = payload.get("uri")
    if payload.get("modality") != "image" or not isinstance(uri, str) or "://" in uri:
        return None
    path = Path(uri)
    if not path.is_absolute() or path.suffix.lower() not in MEDIA_TYPES:
        return None
    return path


class Thumbnails:
    """JPEG thumbnails made on first request and kept in `folder`, keyed by item id and content hash.

    A re-indexed photo has a new content hash, so its stale thumbnail is never served.
    """

    def __init__(self, folder: Path, size: int = THUMBNAIL_SIZE, max_pixels: int = MAX_PIXELS) -> None:
        self.folder = folder
        self.size = size
        self.max_pixels = max_pixels

    def get(self, item_id: str, payload: dict[str, Any], source: Path) -> Path:
        """The cached thumbnail of `source`, made now if missing; ImageDecodeError if it won't decode."""
        digest = str(payload.get("content_hash", ""))[:16]
        path = self.folder / f"{item_id}-{digest}-{self.size}.jpg"
        if not path.is_file():
            image = load_image(source, self.max_pixels)
            image.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            _write_atomic(path, buffer.getvalue())
        return path

    def forget(self, item_id: str) -> None:
        """Remove every cached thumbnail of an item (after it is deleted)."""
        for path in self.folder.glob(f"{item_id}-*.jpg"):
            path.unlink(missing_ok=True)


def upload_suffix(data: bytes) -> str:
    """The suffix an uploaded image is stored with, from its format; ImageDecodeError for other formats."""
    with Image.open(io.BytesIO(data)) as image:
        image_format = image.format or "unknown"
    if image_format not in UPLOAD_SUFFIXES:
        raise ImageDecodeError("unsupported image format", f"{image_format}; send JPEG, PNG, WebP, GIF, BMP or TIFF")
    return UPLOAD_SUFFIXES[image_format]


def save_upload(data: bytes, suffix: str, folder: Path) -> Path:
    """Store uploaded image bytes under their content hash: the same photo uploaded twice is one file."""
    path = folder / f"{content_hash(data)}{suffix}"
    if not path.is_file():
        _write_atomic(path, data)
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
