"""The framework-free agent API: one search function, its JSON function-calling schema, and the
rules that turn a query string into text or an image.

    from mmrag.agent import search_tool, tool_schema
    tools = [tool_schema("photo_search", "Find photos in my library")]   # hand to any LLM API
    results = search_tool(index, **tool_call_arguments)                  # list of plain dicts

Nothing here imports LangChain; `mmrag.integrations.langchain` builds its tool from these pieces.

Query strings (`resolve_query`), checked in this order, so each string has exactly one meaning:

1. `data:image/<type>;base64,<payload>` is an inline image (any other `data:` URI is an error).
2. `http://` or `https://` followed by a host and no whitespace is an image to fetch, with a
   timeout and a size cap; only when the caller allows fetching (`fetch_urls=True`).
3. A string that ends in an image suffix (`.jpg`, `.png`, ...) and names an existing file is an
   image path (the same rule as `Index.search`); one with no whitespace that names no file is an
   error, so a mistyped path never silently becomes a text search.
4. Anything else is text. `Path`, bytes, PIL images and arrays are always images.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .media import IMAGE_SUFFIXES, ImageDecodeError, decode_bytes

if TYPE_CHECKING:
    from .index import Index, Query, SearchHit, Target

#: Default limits for fetching an http(s) image query.
FETCH_TIMEOUT_S = 10.0
MAX_FETCH_BYTES = 20 * 1024 * 1024

#: Upper bound on `k` in the tool schema, so a model cannot ask for the whole index.
MAX_TOOL_K = 50

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_URL = re.compile(r"^https?://[^\s/?#]+\S*$", re.I)


class ImageFetchError(ValueError):
    """An http(s) image query that could not be fetched: timeout, HTTP error, too large, not an image."""


def is_data_uri(text: str) -> bool:
    return text[:5].lower() == "data:"


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def resolve_query(
    query: Any,
    *,
    fetch_urls: bool = True,
    timeout: float = FETCH_TIMEOUT_S,
    max_bytes: int = MAX_FETCH_BYTES,
) -> "Query":
    """A query as `Index.search` takes it: text stays a str; data URIs and URLs become bytes.

    See the module docstring for the string rules. Raises ValueError (ImageFetchError for URLs)
    with the reason, before any model runs.
    """
    if isinstance(query, (Path, bytes, Image.Image, np.ndarray)):
        return query
    if isinstance(query, (bytearray, memoryview)):
        return bytes(query)
    if not isinstance(query, str):
        raise TypeError(f"a query is text or an image (path, URL, data URI, bytes, PIL), got {type(query).__name__}")
    text = query.strip()
    if is_data_uri(text):
        return _decode_data_uri(text)
    if is_url(text):
        if not fetch_urls:
            raise ValueError(f"fetching image URLs is turned off here; got {_short(text)}")
        return fetch_image(text, timeout=timeout, max_bytes=max_bytes)
    if len(text) < 4096 and Path(text).suffix.lower() in IMAGE_SUFFIXES:
        if Path(text).is_file():
            return Path(text)
        if not any(c.isspace() for c in text):
            raise ValueError(f"no image file at {_short(text)} (a string ending in an image suffix is a path)")
    return query


def fetch_image(url: str, *, timeout: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_FETCH_BYTES) -> bytes:
    """The bytes of an image at an http(s) URL; ImageFetchError on timeout, HTTP error or size cap.

    `timeout` bounds the whole fetch, not just each read. The size is checked from Content-Length
    when sent and again while reading, so a server that lies or streams forever is cut off. The bytes are decoded once here so a
    non-image (an HTML error page) fails with the URL in the message.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "mmrag", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageFetchError(f"{_short(url)}: {int(length):,} bytes exceeds the {max_bytes:,}-byte cap")
            data = _read_capped(response, url, max_bytes, time.monotonic() + timeout)
    except ImageFetchError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageFetchError(f"{_short(url)}: HTTP {exc.code} {exc.reason}") from None
    except TimeoutError:
        raise ImageFetchError(f"{_short(url)}: no answer within {timeout:g} s") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise ImageFetchError(f"{_short(url)}: no answer within {timeout:g} s") from None
        raise ImageFetchError(f"{_short(url)}: cannot fetch ({reason})") from None
    try:
        decode_bytes(data)
    except ImageDecodeError as exc:
        raise ImageFetchError(f"{_short(url)}: {exc}") from None
    return data


def _read_capped(response: Any, url: str, max_bytes: int, deadline: float) -> bytes:
    """Read in chunks so both the byte cap and the overall deadline hold against a slow server."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = response.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise ImageFetchError(f"{_short(url)}: more than the {max_bytes:,}-byte cap")
        if time.monotonic() > deadline:
            raise TimeoutError
        chunks.append(chunk)


def _decode_data_uri(text: str) -> bytes:
    match = _DATA_URI.match(text)
    mime = (match.group("mime") or "") if match else ""
    if not match or not mime.lower().startswith("image/") or not match.group("b64"):
        raise ValueError(f"only base64 image data URIs (data:image/...;base64,...) are queries; got {_short(text)}")
    try:
        return base64.b64decode(text[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data URI's base64 payload is malformed") from None


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- the tool -------------------------------------------------------------------------------------

def hit_to_dict(hit: "SearchHit") -> dict[str, Any]:
    """A search hit as JSON-serialisable data (what a model reads back from the tool)."""
    return {
        "id": hit.id,
        "score": float(hit.score),
        "uri": hit.uri,
        "captions": list(hit.captions),
        "modality": hit.modality,
        "payload": _jsonable(hit.payload),
    }


def search_tool(
    index: "Index",
    query: str,
    k: int = 5,
    target: "Target" = "image",
    filters: dict[str, Any] | None = None,
    *,
    fetch_urls: bool = False,
) -> list[dict[str, Any]]:
    """Search `index` with the arguments of a tool call; returns plain, JSON-serialisable dicts.

    URL fetching is off by default here because the query comes from a model: turning it on lets
    the model make this process fetch any address it names.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOOL_K:
        raise ValueError(f"k must be an integer from 1 to {MAX_TOOL_K}, got {k!r}")
    resolved = resolve_query(query, fetch_urls=fetch_urls)
    hits = index.search(resolved, k=k, target=target, filter=filters or None)
    return [hit_to_dict(hit) for hit in hits]


#: The parameters of `search_tool`, as JSON Schema.
SEARCH_TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "query": {
            "type": "string",
            "description": (
                "What to look for: a text description, or an image as a file path or a "
                "data:image/...;base64 URI."
            ),
        },
        "k": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_TOOL_K,
            "default": 5,
            "description": "How many results to return.",
        },
        "target": {
            "type": "string",
            "enum": ["image", "text", "both"],
            "default": "image",
            "description": "Compare with the items' images, their captions/texts, or both fused.",
        },
        "filters": {
            "type": "object",
            "description": (
                "Payload filters: every key must match; a list value matches any of its items."
            ),
            "additionalProperties": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "integer"},
                    {"type": "boolean"},
                    {"type": "array", "items": {"type": "string"}},
                    {"type": "array", "items": {"type": "integer"}},
                ]
            },
        },
    },
    "required": ["query"],
    "additionalProperties": False,
}

DEFAULT_TOOL_NAME = "mmrag_search"
DEFAULT_TOOL_DESCRIPTION = (
    "Search a multimodal index of photos and texts. Returns the best matches with their id, "
    "score, uri, captions and metadata."
)


def tool_schema(name: str = DEFAULT_TOOL_NAME, description: str = DEFAULT_TOOL_DESCRIPTION) -> dict[str, Any]:
    """The search tool in the common JSON function-calling form (OpenAI-style `tools` entries)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError(f"a tool name is 1-64 letters, digits, '_' or '-', got {name!r}")
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": copy.deepcopy(SEARCH_TOOL_PARAMETERS)},
    }


SEARCH_TOOL_SCHEMA: dict[str, Any] = tool_schema()


def _jsonable(value: Any) -> Any:
    """Payload values as plain JSON types (Qdrant gives them back so already; numpy is defended)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
