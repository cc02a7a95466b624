"""Routes that send an item's image: the original file, or a cached thumbnail. Reads need no key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from ..index import SearchHit
from ..media import ImageDecodeError
from .images import MEDIA_TYPES, image_file
from .schemas import Error
from .state import State

router = APIRouter(prefix="/api/items", tags=["images"], responses={404: {"model": Error}})


@router.get("/{item_id}/image", response_class=FileResponse, summary="An item's original image file")
def item_image(item_id: str, state: State) -> FileResponse:
    hit = state.lookup(item_id)
    path = _existing_file(hit)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lower()])


@router.get("/{item_id}/thumbnail", response_class=FileResponse, summary="An item's thumbnail (JPEG, made once)",
            responses={422: {"model": Error, "description": "The image file no longer decodes."}})
def item_thumbnail(item_id: str, state: State) -> FileResponse:
    hit = state.lookup(item_id)
    source = _existing_file(hit)
    try:
        thumbnail = state.thumbnails.get(hit.id, hit.payload, source)
    except ImageDecodeError as exc:
        raise HTTPException(422, f"the image of item {hit.id} no longer decodes: {exc}") from None
    return FileResponse(thumbnail, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _existing_file(hit: SearchHit) -> Path:
    """The item's own image file, found through its stored payload; 404 for text items and missing files."""
    path = image_file(hit.payload)
    if path is None:
        raise HTTPException(404, f"item {hit.id} has no image file")
    if not path.is_file():
        raise HTTPException(404, f"the image file of item {hit.id} is missing on the server")
    return path
