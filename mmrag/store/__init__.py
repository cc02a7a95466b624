"""Where embeddings live: a Qdrant Edge directory (the default) or a Qdrant server / `":memory:"`.

    open_store("./my-index")                       # EdgeStore: embedded, one process per directory
    open_store("http://localhost:6333", collection="photos", api_key=...)   # ClientStore
    open_store(":memory:")                         # ClientStore on qdrant-client's local mode

A server or cluster also takes `prefer_grpc`/`grpc_port`, `cluster=ClusterOptions(...)` (shards
and replicas of a new collection) and `requests=RequestOptions(...)` (request size, retries).
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import (
    VECTOR_NAMES,
    Hit,
    IndexManifest,
    IndexMismatchError,
    PayloadFilter,
    Point,
    Store,
    VectorName,
)
from .client import ClientStore, ClusterOptions
from .edge import EdgeOptions, EdgeStore, StoreLockedError
from .transport import RequestOptions, RequestTooLargeError

__all__ = [
    "VECTOR_NAMES",
    "ClientStore",
    "ClusterOptions",
    "EdgeOptions",
    "EdgeStore",
    "Hit",
    "IndexManifest",
    "IndexMismatchError",
    "PayloadFilter",
    "Point",
    "RequestOptions",
    "RequestTooLargeError",
    "Store",
    "StoreLockedError",
    "VectorName",
    "is_client_location",
    "open_store",
]

DEFAULT_COLLECTION = "mmrag"


def is_client_location(location: str | os.PathLike[str]) -> bool:
    """True for `":memory:"` and `http(s)://` URLs (qdrant-client); False for a directory path."""
    return isinstance(location, str) and (
        location == ":memory:" or location.lower().startswith(("http://", "https://"))
    )


def open_store(
    location: str | Path,
    *,
    collection: str = DEFAULT_COLLECTION,
    api_key: str | None = None,
    prefer_grpc: bool = False,
    grpc_port: int | None = None,
    cluster: ClusterOptions | None = None,
    requests: RequestOptions | None = None,
) -> Store:
    """Open the store at `location`.

    `":memory:"` or an `http://` / `https://` URL gives a `ClientStore` on `collection` (see it
    for the other arguments); anything else is a directory and gives an `EdgeStore`, for which
    they mean nothing and are refused. The store's `manifest` is None until `create(manifest)`
    when nothing is there yet.
    """
    if not isinstance(location, (str, os.PathLike)):
        raise ValueError(f"location must be a directory path, ':memory:' or an http(s):// URL, got {location!r}")
    if isinstance(location, str) and not location:
        raise ValueError("location must not be empty")
    if is_client_location(location):
        return ClientStore(
            str(location), collection=collection, api_key=api_key, prefer_grpc=prefer_grpc, grpc_port=grpc_port,
            cluster=cluster, requests=requests,
        )
    given = [
        name
        for name, is_set in (
            ("collection", collection != DEFAULT_COLLECTION),
            ("api_key", api_key is not None),
            ("prefer_grpc", bool(prefer_grpc)),
            ("grpc_port", grpc_port is not None),
            ("cluster", cluster is not None),
            ("requests", requests is not None),
        )
        if is_set
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to a Qdrant server URL or ':memory:', not to a directory "
            f"({str(location)!r}); a directory holds one Edge index"
        )
    return EdgeStore(location)
