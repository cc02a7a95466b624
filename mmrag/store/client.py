"""`ClientStore`: the same store over `qdrant_client.QdrantClient`, for a Qdrant server or cluster
(`http(s)://host:6333`) or `":memory:"` (qdrant-client's local mode, for tests and small demos).

Where the manifest lives: in the collection's own `metadata` (a JSON object set on
`create_collection` and returned by `get_collection().config.metadata`; qdrant-client 1.20 has
both, and Qdrant servers from 1.16 keep it). So the manifest cannot drift from the data, travels
with snapshots and needs no reserved point (which would show up in counts, scrolls and searches)
or sidecar collection (which a second writer could leave out of step). Servers too old to keep
collection metadata are detected right after `create` and refused with a clear error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from .base import (
    INDEXED_KEYWORD_FIELDS,
    VECTOR_NAMES,
    Hit,
    IndexManifest,
    IndexMismatchError,
    PayloadFilter,
    Point,
    Store,
    VectorName,
    canonical_id,
    record_vectors,
    check_k,
    check_manifest,
    check_using,
    filter_conditions,
    fused_prefetch_limit,
    point_vectors,
    query_list,
)

#: Key of the manifest inside the collection's metadata.
MANIFEST_KEY = "mmrag_manifest"

# `FusionQuery(fusion=RRF)` uses the engine's default k (2), which is what base.RRF_K records and
# EdgeStore passes explicitly; qdrant-client's `RrfQuery(rrf=Rrf(k=...))` would need a newer server.


class ClientStore(Store):
    """A `Store` over a qdrant-client collection.

    `location` is `":memory:"` or an `http://` / `https://` URL; `api_key`, `prefer_grpc` and
    `timeout` go to `QdrantClient` and apply to URLs only. An existing collection made by mmrag is
    opened with its manifest; a missing one leaves `manifest` None until `create(manifest)`.
    To reuse a client you already have, use `ClientStore.from_client(client, collection)`.
    """

    #: Points per upsert request.
    batch_size: int = 256

    def __init__(
        self,
        location: str,
        *,
        collection: str = "mmrag",
        api_key: str | None = None,
        prefer_grpc: bool = False,
        timeout: int | None = None,
    ) -> None:
        if not isinstance(location, str):
            raise ValueError(f"location must be ':memory:' or an http(s):// URL, got {location!r}")
        if location == ":memory:":
            if api_key is not None or prefer_grpc or timeout is not None:
                raise ValueError("api_key, prefer_grpc and timeout apply to a server URL, not to ':memory:'")
            client = QdrantClient(location=":memory:")
        elif location.lower().startswith(("http://", "https://")):
            client = QdrantClient(url=location, api_key=api_key, prefer_grpc=prefer_grpc, timeout=timeout)
        else:
            raise ValueError(
                f"location must be ':memory:' or an http(s):// URL, got {location!r}; "
                "for a directory use EdgeStore (or open_store)"
            )
        self.location = location
        self._init(client, collection, owns_client=True)

    @classmethod
    def from_client(cls, client: QdrantClient, collection: str = "mmrag") -> ClientStore:
        """Wrap a client you manage (it is not closed by `close()`)."""
        if not isinstance(client, QdrantClient):
            raise ValueError(f"client must be a QdrantClient, got {type(client).__name__}")
        self = cls.__new__(cls)
        self.location = "<client>"
        self._init(client, collection, owns_client=False)
        return self

    def _init(self, client: QdrantClient, collection: str, *, owns_client: bool) -> None:
        if not isinstance(collection, str) or not collection:
            raise ValueError(f"collection must be a non-empty string, got {collection!r}")
        self.client = client
        self.collection = collection
        self._owns_client = owns_client
        self._closed = False
        self.manifest: IndexManifest | None = None
        if client.collection_exists(collection):
            self.manifest = self._read_manifest()

    # --- lifecycle ----------------------------------------------------------------------------

    def create(self, manifest: IndexManifest) -> None:
        """Create the collection (`image` and `text`, cosine, width `manifest.dim`) with the manifest.

        On a collection that already holds an index this is a no-op when `manifest` matches the
        stored one and raises `IndexMismatchError` when it does not.
        """
        self._check_open()
        check_manifest(manifest)
        if self.manifest is not None:
            if self.manifest != manifest:
                raise IndexMismatchError(
                    f"collection {self.collection!r} already holds an index built with {self.manifest}; got {manifest}"
                )
            return
        self.client.create_collection(
            collection_name=self.collection,
            vectors_config={
                name: models.VectorParams(size=manifest.dim, distance=models.Distance.COSINE) for name in VECTOR_NAMES
            },
            metadata={MANIFEST_KEY: manifest.to_dict()},
        )
        stored = (self.client.get_collection(self.collection).config.metadata or {}).get(MANIFEST_KEY)
        if stored is None:
            self.client.delete_collection(self.collection)
            raise RuntimeError(
                f"the Qdrant server at {self.location} did not keep the collection metadata that holds "
                "mmrag's manifest; upgrade the server (collection metadata needs Qdrant 1.16 or newer)"
            )
        with warnings.catch_warnings():
            # local mode ignores payload indexes (it filters by scanning) and says so each time
            warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")
            for name in INDEXED_KEYWORD_FIELDS:
                self.client.create_payload_index(
                    self.collection, field_name=name, field_schema=models.PayloadSchemaType.KEYWORD, wait=True
                )
        self.manifest = manifest

    def close(self) -> None:
        """Close the client if this store made it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self.client.close()

    # --- writes -------------------------------------------------------------------------------

    def upsert(self, points: Sequence[Point]) -> None:
        """Insert or overwrite points by id, in batches of `batch_size`.

        Every point is checked before the first write, so a batch with one bad vector (NaN,
        infinite, all zero, wrong width) raises ValueError and stores nothing.
        """
        manifest = self._manifest()
        prepared = [
            models.PointStruct(id=canonical_id(p.id), vector=point_vectors(p, manifest), payload=dict(p.payload))
            for p in points
        ]
        for start in range(0, len(prepared), self.batch_size):
            self.client.upsert(self.collection, points=prepared[start : start + self.batch_size], wait=True)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete points by id; returns how many of them existed."""
        self._manifest()
        found = sorted({canonical_id(i) for i in self.existing(ids)})
        for start in range(0, len(found), self.batch_size):
            self.client.delete(
                self.collection,
                points_selector=models.PointIdsList(points=found[start : start + self.batch_size]),
                wait=True,
            )
        return len(found)

    # --- reads --------------------------------------------------------------------------------

    def search(
        self, vector: np.ndarray, using: VectorName, k: int, filter: PayloadFilter | None = None
    ) -> list[Hit]:
        manifest = self._manifest()
        using = check_using(using)
        k = check_k(k)
        response = self.client.query_points(
            self.collection,
            query=query_list(vector, manifest),
            using=using,
            query_filter=_to_filter(filter),
            limit=k,
            with_payload=True,
            with_vectors=False,
        )
        return [_hit(p) for p in response.points]

    def search_fused(self, vector: np.ndarray, k: int, filter: PayloadFilter | None = None) -> list[Hit]:
        manifest = self._manifest()
        k = check_k(k)
        query = query_list(vector, manifest)
        flt = _to_filter(filter)
        depth = fused_prefetch_limit(k)
        response = self.client.query_points(
            self.collection,
            prefetch=[models.Prefetch(query=query, using=name, filter=flt, limit=depth) for name in VECTOR_NAMES],
            query=models.FusionQuery(fusion=models.Fusion.RRF),
            # every candidate, so ties are cut the same way on every backend (below)
            limit=2 * depth,
            with_payload=True,
            with_vectors=False,
        )
        hits = [_hit(p) for p in response.points]
        hits.sort(key=lambda h: (-h.score, h.id))
        return hits[:k]

    def existing(self, ids: Sequence[str]) -> set[str]:
        """The subset of `ids` (as given) already stored."""
        self._manifest()
        wanted = {i: canonical_id(i) for i in ids}
        unique = sorted(set(wanted.values()))
        found: set[str] = set()
        for start in range(0, len(unique), 1000):
            records = self.client.retrieve(
                self.collection, ids=unique[start : start + 1000], with_payload=False, with_vectors=False
            )
            found.update(str(r.id) for r in records)
        return {i for i, c in wanted.items() if c in found}

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[Hit]:
        """Stored points by id (score 1.0), in the order given; missing ids are left out."""
        self._manifest()
        wanted = [(i, canonical_id(i)) for i in ids]
        unique = sorted({c for _, c in wanted})
        found: dict[str, Hit] = {}
        for start in range(0, len(unique), 1000):
            records = self.client.retrieve(
                self.collection, ids=unique[start : start + 1000], with_payload=True, with_vectors=with_vectors
            )
            for r in records:
                found[str(r.id)] = Hit(str(r.id), 1.0, dict(r.payload or {}), record_vectors(r.vector))
        return [replace(found[c], id=i) for i, c in wanted if c in found]

    def count(self) -> int:
        self._manifest()
        return self.client.count(self.collection, exact=True).count

    # --- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the store for collection {self.collection!r} is closed")

    def _manifest(self) -> IndexManifest:
        self._check_open()
        if self.manifest is None:
            raise RuntimeError(f"collection {self.collection!r} holds no index yet; call create(manifest) first")
        return self.manifest

    def _read_manifest(self) -> IndexManifest:
        config = self.client.get_collection(self.collection).config
        data = (config.metadata or {}).get(MANIFEST_KEY)
        if not isinstance(data, dict):
            raise ValueError(
                f"collection {self.collection!r} exists but was not created by mmrag (no {MANIFEST_KEY!r} "
                "in its metadata); pick another collection name"
            )
        manifest = IndexManifest.from_dict(data)
        vectors = config.params.vectors
        if not isinstance(vectors, dict):
            vectors = {}
        sizes = {name: getattr(vectors.get(name), "size", None) for name in VECTOR_NAMES}
        if any(sizes.get(name) != manifest.dim for name in VECTOR_NAMES):
            raise IndexMismatchError(
                f"collection {self.collection!r}: its manifest says dim={manifest.dim} but its vectors are {sizes}"
            )
        return manifest

    def __repr__(self) -> str:
        return f"ClientStore({self.location!r}, collection={self.collection!r}, manifest={self.manifest!r})"


def _to_filter(filter: PayloadFilter | None) -> models.Filter | None:
    conditions = filter_conditions(filter)
    if not conditions:
        return None
    return models.Filter(
        must=[
            models.FieldCondition(
                key=key,
                match=models.MatchAny(any=value) if isinstance(value, list) else models.MatchValue(value=value),
            )
            for key, value in conditions
        ]
    )


def _hit(point: models.ScoredPoint) -> Hit:
    return Hit(id=str(point.id), score=float(point.score), payload=dict(point.payload or {}))
