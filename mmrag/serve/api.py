"""The JSON API: search by text, by an uploaded image or by an indexed item; add, get and delete items.

Reads are open; writes need the configured key in an `X-API-Key` header (401 without, 403 wrong).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, Response, Security, UploadFile
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from ..index import SearchHit
from ..ingest import file_id
from ..media import ImageDecodeError, decode_bytes
from ..sources import file_item
from . import schemas
from .images import image_file, save_upload, upload_suffix
from .schemas import MAX_K, MAX_TEXT_CHARS, Error, PayloadFilter, Target
from .state import ServeState, State

router = APIRouter(prefix="/api", responses={400: {"model": Error}, 422: {"model": Error}})

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed for writes when the server has a key.")

#: Payload keys an Item states in its own fields, or keeps private (`uri`: a path on the server);
#: every other key (split, categories, tags, ...) is passed on as `metadata`.
NOT_METADATA = frozenset({"uri", "captions", "content_hash", "modality", "text"})

#: How an undecodable upload is answered: too many pixels is 413, anything else 400.
DECODE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "Not an image, or a corrupt one."},
    413: {"model": Error, "description": "Request body or image dimensions over the limit."},
}


def require_key(state: State, given: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """Let a write through only with the configured key (constant-time compare); no key set: open."""
    expected = state.config.api_key
    if expected is None:
        return
    if not given:
        raise HTTPException(401, "writes need an X-API-Key header")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(403, "wrong API key")


Writes = [Depends(require_key)]
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": Error}, 403: {"model": Error}}


@router.get("/info", response_model=schemas.Info, summary="What the index holds, and the server's limits")
def info(state: State) -> schemas.Info:
    with state.lock:
        about = state.index.info()
    return schemas.Info(
        encoder_spec=about.encoder_spec, dim=about.dim, distance=about.distance, count=about.count, max_k=MAX_K,
        max_upload_bytes=state.config.max_upload_bytes, max_pixels=state.config.max_pixels,
        writes_need_key=state.config.api_key is not None,
    )


@router.post("/search/text", response_model=schemas.SearchResult, summary="Search by text")
def search_text(body: schemas.TextSearch, request: Request, state: State) -> schemas.SearchResult:
    return _search(request, state, lambda: state.index.search(body.text, body.k, body.target, body.filter))


@router.post("/search/image", response_model=schemas.SearchResult, summary="Search by an uploaded image",
             responses=DECODE_ERRORS)
def search_image(
    request: Request,
    state: State,
    image: Annotated[UploadFile, File(description="The query photo (JPEG, PNG, WebP, ...).")],
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    target: Annotated[Target, Form()] = "image",
    filter: Annotated[str | None, Form(description='Payload filter as JSON, e.g. {"split": "val2017"}.')] = None,
) -> schemas.SearchResult:
    payload_filter = _parse_filter(filter)
    query = _decode(image.file.read(), state)
    return _search(request, state, lambda: state.index.search(query, k, target, payload_filter))


@router.post("/search/similar", response_model=schemas.SearchResult, summary="More like an indexed item",
             responses={404: {"model": Error}})
def search_similar(body: schemas.SimilarSearch, request: Request, state: State) -> schemas.SearchResult:
    hit = state.lookup(body.id)
    return _search(request, state, lambda: state.index.similar(hit.id, body.k, body.target, body.filter))


@router.get("/items/{item_id}", response_model=schemas.Item, summary="One indexed item",
            responses={404: {"model": Error}})
def get_item(item_id: str, request: Request, state: State) -> schemas.Item:
    return schemas.Item(**_item_fields(state.lookup(item_id), request))


@router.post("/items", response_model=schemas.Added, status_code=201, dependencies=Writes,
             summary="Add a photo, with an optional caption",
             responses={**DECODE_ERRORS, **WRITE_ERRORS, 415: {"model": Error, "description": "Not JPEG, PNG, WebP, GIF, BMP or TIFF."}})
def add_item(
    request: Request,
    response: Response,
    state: State,
    image: Annotated[UploadFile, File(description="The photo to index.")],
    caption: Annotated[str | None, Form(max_length=MAX_TEXT_CHARS)] = None,
) -> schemas.Added:
    data = image.file.read()
    _decode(data, state)  # refuse what won't decode before anything is written
    try:
        suffix = upload_suffix(data)
    except ImageDecodeError as exc:
        raise HTTPException(415, str(exc)) from None
    path = save_upload(data, suffix, state.uploads)
    item = file_item(path, captions=[caption] if caption and caption.strip() else [])
    with state.lock:
        report = state.index.add([item], workers=0, progress=False)
        stored = state.index.get([file_id(item)])
    if not stored:  # the encoder refused it (a zero vector, say): no item names the file, so it goes
        path.unlink(missing_ok=True)
        raise HTTPException(400, "not indexed: " + "; ".join(skipped.reason for skipped in report.skipped))
    status = "added" if report.added else "updated" if report.updated else "already_present"
    response.status_code = 201 if status == "added" else 200
    return schemas.Added(status=status, item=schemas.Item(**_item_fields(stored[0], request)))


@router.delete("/items/{item_id}", response_model=schemas.Deleted, dependencies=Writes,
               summary="Delete an item (and its uploaded file and thumbnails)",
               responses={404: {"model": Error}, **WRITE_ERRORS})
def delete_item(item_id: str, state: State) -> schemas.Deleted:
    hit = state.lookup(item_id)
    with state.lock:
        state.index.delete([hit.id])
    state.thumbnails.forget(hit.id)
    path = image_file(hit.payload)
    if path is not None and path.parent == state.uploads:
        path.unlink(missing_ok=True)  # an upload is the server's own copy; indexed folders are never touched
    return schemas.Deleted(deleted=hit.id)


def _search(request: Request, state: ServeState, search: Callable[[], list[SearchHit]]) -> schemas.SearchResult:
    """Run a search under the index lock: a bad filter or empty query (ValueError) is a 400, and an
    item deleted since it was looked up (KeyError) a 404."""
    started = time.perf_counter()
    try:
        with state.lock:
            hits = search()
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    except KeyError as exc:
        raise HTTPException(404, f"no item with id {exc.args[0]!r}") from None
    return schemas.SearchResult(
        hits=[schemas.Hit(score=hit.score, **_item_fields(hit, request)) for hit in hits],
        seconds=round(time.perf_counter() - started, 4),
    )


def _decode(data: bytes, state: ServeState) -> Image.Image:
    """Decode an upload within the pixel limit: 413 for too many pixels (a bomb), 400 for the rest."""
    try:
        return decode_bytes(data, state.config.max_pixels)
    except ImageDecodeError as exc:
        raise HTTPException(413 if exc.reason == "image too large" else 400, f"upload refused: {exc}") from None


def _parse_filter(text: str | None) -> PayloadFilter | None:
    """A multipart form's filter field, JSON text, checked as the JSON bodies' filter is."""
    if text is None or not text.strip():
        return None
    try:
        return TypeAdapter(PayloadFilter).validate_json(text)
    except ValidationError as exc:
        raise HTTPException(422, f"filter: {exc.errors()[0]['msg']}") from None


def _item_fields(hit: SearchHit, request: Request) -> dict[str, Any]:
    """What the API says about an item; its folder stays private, its image is reachable by id."""
    payload = hit.payload
    path = image_file(payload)
    base = f"{request.scope.get('root_path', '')}/api/items/{hit.id}"
    return {
        "id": hit.id,
        "modality": payload.get("modality", "image"),
        "name": path.name if path else None,
        "captions": list(payload.get("captions") or []),
        "text": payload.get("text"),
        "metadata": {key: value for key, value in payload.items() if key not in NOT_METADATA},
        "image_url": f"{base}/image" if path else None,
        "thumbnail_url": f"{base}/thumbnail" if path else None,
    }
