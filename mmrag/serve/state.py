"""What every route shares: the index behind a lock, the settings, and where media files go."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from ..index import Index, SearchHit
from ..media import MAX_PIXELS
from ..store import is_client_location
from .images import Thumbnails

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """How a served index may be used.

    `api_key`: the key writes (add, delete) need in an `X-API-Key` header; None leaves writes
    open, which is safe only on loopback. `max_upload_bytes`: the largest request body.
    `max_pixels`: the largest image decoded (a decompression bomb is refused before decoding).
    `media_dir`: where uploaded photos and thumbnails are kept; default `DIR/serve` for a
    folder index, else a new temporary folder (uploads there vanish with it).
    """

    api_key: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    media_dir: Path | None = None


class ServeState:
    """The index and its lock (Qdrant Edge and the encoder see one request at a time), plus media folders."""

    def __init__(self, index: Index, config: ServeConfig) -> None:
        self.index = index
        self.config = config
        self.lock = threading.Lock()
        media = Path(os.path.abspath(config.media_dir or _default_media_dir(index)))  # as uris are written
        self.uploads = media / "uploads"
        self.thumbnails = Thumbnails(media / "thumbnails", max_pixels=config.max_pixels)

    def lookup(self, item_id: str) -> SearchHit:
        """The stored item with this id, or 404 (for a malformed id too: it names no item either)."""
        try:
            canonical = str(uuid.UUID(item_id))
        except ValueError:
            raise HTTPException(404, f"no item with id {item_id[:80]!r}") from None
        with self.lock:
            found = self.index.get([canonical])
        if not found:
            raise HTTPException(404, f"no item with id {canonical!r}")
        return found[0]


def get_state(request: Request) -> ServeState:
    return request.app.state.mmrag


State = Annotated[ServeState, Depends(get_state)]


def _default_media_dir(index: Index) -> Path:
    if index.location and not is_client_location(index.location):
        return Path(index.location) / "serve"
    folder = Path(tempfile.mkdtemp(prefix="mmrag-serve-"))
    logger.warning("index %s is not a folder: uploads and thumbnails go to %s, which nothing keeps; "
                   "set ServeConfig(media_dir=...) to keep them", index.location, folder)
    return folder
