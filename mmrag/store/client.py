"""`ClientStore`: the same store over `qdrant_client.QdrantClient`, for a Qdrant server or cluster
(`http(s)://host:6333`) or `":memory:"` (qdrant-client's local mode, for tests and small demos).

Where the manifest lives: in the collection's own `metadata` (a JSON object set on
`create_collection` and returned by `get_collection().config.metadata`; qdrant-client 1.20 has
both, and Qdrant servers from 1.16 keep it). So the manifest cannot drift from the data, travels
with snapshots and needs no reserved point (which would show up in counts, scrolls and searches)
or sidecar collection (which a second writer could leave out of step). Servers too old to keep
collection metadata are detected right after `create` and refused with a clear error.

On a server, requests are sized and retried by `transport` (`RequestOptions`), and a new
collection is laid out over the cluster by `ClusterOptions`; neither is recorded in the manifest.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

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
    check_positive_int,
    check_manifest,
    check_using,
    filter_conditions,
    fused_prefetch_limit,
    keyword_fields_in,
    point_vectors,
    query_list,
    record_hit,
)
from .transport import RequestOptions, call_with_retries, size_batches

#: Key of the manifest inside the collection's metadata.
MANIFEST_KEY = "mmrag_manifest"

T = TypeVar("T")

# `FusionQuery(fusion=RRF)` uses the engine's default k (2), which is what base.RRF_K records and
# EdgeStore passes explicitly; qdrant-client's `RrfQuery(rrf=Rrf(k=...))` would need a newer server.


@dataclass(frozen=True)
class ClusterOptions:
    """How a new collection is laid out on a Qdrant cluster; None leaves the server's default.

    They go to `create_collection` when mmrag creates the collection; an existing collection keeps
    its own layout. They are not recorded in the manifest: they describe the deployment, not the
    vectors, so the same index may live on one node in a test and on six in production.
    """

    #: Shards the points are spread over (fixed at creation).
    shard_number: int | None = None
    #: Copies of each shard, on different nodes.
    replication_factor: int | None = None
    #: Copies that must confirm a write before it succeeds.
    write_consistency_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("shard_number", "replication_factor", "write_consistency_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        rf, wcf = self.replication_factor, self.write_consistency_factor
        if rf is not None and wcf is not None and wcf > rf:
            raise ValueError(
                f"write_consistency_factor ({wcf}) cannot exceed replication_factor ({rf}): "
                "every write would wait for more copies than exist"
            )


class ClientStore(Store):
    """A `Store` over a qdrant-client collection.

    `location` is `":memory:"` or an `http://` / `https://` URL; `api_key`, `prefer_grpc`,
    `grpc_port`, `timeout` and `cluster` apply to URLs only. `requests` sets the request-size
    limit and the retries on transient errors. An existing collection made by mmrag is opened
    with its manifest; a missing one leaves `manifest` None until `create(manifest)`. To reuse
    a client you already have, use `ClientStore.from_client(client, collection)`.
    """

    #: Most points per upsert or delete request (upserts are also kept under `max_request_bytes`).
    batch_size: int = 256

    def __init__(
        self,
        location: str,
        *,
        collection: str = "mmrag",
        api_key: str | None = None,
        prefer_grpc: bool = False,
        grpc_port: int | None = None,
        timeout: int | None = None,
        cluster: ClusterOptions | None = None,
        requests: RequestOptions | None = None,
    ) -> None:
        if not isinstance(location, str):
            raise ValueError(f"location must be ':memory:' or an http(s):// URL, got {location!r}")
        if location == ":memory:":
            server_only = {
                "api_key": api_key is not None,
                "prefer_grpc": bool(prefer_grpc),
                "grpc_port": grpc_port is not None,
                "timeout": timeout is not None,
                "cluster": cluster is not None,
            }
            given = [name for name, is_set in server_only.items() if is_set]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise ValueError(f"{', '.join(given)} {verb} to a server URL, not to ':memory:'")
            client = QdrantClient(location=":memory:")
        elif location.lower().startswith(("http://", "https://")):
            ports = {} if grpc_port is None else {"grpc_port": _port(grpc_port)}
            client = QdrantClient(url=location, api_key=api_key, prefer_grpc=prefer_grpc, timeout=timeout, **ports)
        else:
            raise ValueError(
                f"location must be ':memory:' or an http(s):// URL, got {location!r}; "
                "for a directory use EdgeStore (or open_store)"
            )
        self.location = location
        try:
            self._init(client, collection, owns_client=True, cluster=cluster, requests=requests)
        except BaseException:
            client.close()
            raise

    @classmethod
    def from_client(
        cls,
        client: QdrantClient,
        collection: str = "mmrag",
        *,
        cluster: ClusterOptions | None = None,
        requests: RequestOptions | None = None,
    ) -> ClientStore:
        """Wrap a client you manage (it is not closed by `close()`)."""
        if not isinstance(client, QdrantClient):
            raise ValueError(f"client must be a QdrantClient, got {type(client).__name__}")
        self = cls.__new__(cls)
        self.location = "<client>"
        self._init(client, collection, owns_client=False, cluster=cluster, requests=requests)
        return self

    def _init(
        self,
        client: QdrantClient,
        collection: str,
        *,
        owns_client: bool,
        cluster: ClusterOptions | None,
        requests: RequestOptions | None,
    ) -> None:
        if not isinstance(collection, str) or not collection:
            raise ValueError(f"collection must be a non-empty string, got {collection!r}")
        if cluster is not None and not isinstance(cluster, ClusterOptions):
            raise ValueError(f"cluster must be a ClusterOptions, got {type(cluster).__name__}")
        if requests is not None and not isinstance(requests, RequestOptions):
            raise ValueError(f"requests must be a RequestOptions, got {type(requests).__name__}")
        self.client = client
        self.collection = collection
        self.cluster = cluster or ClusterOptions()
        self.requests = requests or RequestOptions()
        self._owns_client = owns_client
        self._closed = False
        self.manifest: IndexManifest | None = None
        if self._call("collection_exists", client.collection_exists, collection):
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
        # not retried: if a lost response hid a success, a second create would fail with 409
        self.client.create_collection(
            collection_name=self.collection,
            vectors_config={
                name: models.VectorParams(size=manifest.dim, distance=models.Distance.COSINE) for name in VECTOR_NAMES
            },
            shard_number=self.cluster.shard_number,
            replication_factor=self.cluster.replication_factor,
            write_consistency_factor=self.cluster.write_consistency_factor,
            metadata={MANIFEST_KEY: manifest.to_dict()},
        )
        config = self._call("get_collection", self.client.get_collection, self.collection).config
        stored = (config.metadata or {}).get(MANIFEST_KEY)
        if stored is None:
            self.client.delete_collection(self.collection)
            raise RuntimeError(
                f"the Qdrant server at {self.location} did not keep the collection metadata that holds "
                "mmrag's manifest; upgrade the server (collection metadata needs Qdrant 1.16 or newer)"
            )
        self._create_keyword_indexes(INDEXED_KEYWORD_FIELDS)
        self.manifest = manifest

    def _create_keyword_indexes(self, names: Iterable[str]) -> None:
        with warnings.catch_warnings():
            # local mode ignores payload indexes (it filters by scanning) and says so each time
            warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local Qdrant")
            for name in names:
                self._call(
                    "create_payload_index", self.client.create_payload_index,
                    self.collection, field_name=name, field_schema=models.PayloadSchemaType.KEYWORD, wait=True,
                )

    def close(self) -> None:
        """Close the client if this store made it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self.client.close()

    # --- writes -------------------------------------------------------------------------------

    def upsert(self, points: Sequence[Point]) -> None:
        """Insert or overwrite points by id, in requests of at most `batch_size` points and
        `requests.max_request_bytes` (estimated), so a server never refuses one as too large.

        Every point is checked before the first write: a bad vector (NaN, infinite, all zero,
        wrong width) raises ValueError and a point too large for any request raises
        RequestTooLargeError (a ValueError); either way nothing from the call is stored.
        """
        manifest = self._manifest()
        prepared = [
            models.PointStruct(id=canonical_id(p.id), vector=point_vectors(p, manifest), payload=dict(p.payload))
            for p in points
        ]
        for batch in size_batches(prepared, self.requests.max_request_bytes, self.batch_size):
            self._call("upsert", self.client.upsert, self.collection, points=batch, wait=True)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete points by id; returns how many of them existed."""
        self._manifest()
        found = sorted({canonical_id(i) for i in self.existing(ids)})
        for start in range(0, len(found), self.batch_size):
            self._call(
                "delete", self.client.delete, self.collection,
                points_selector=models.PointIdsList(points=found[start : start + self.batch_size]), wait=True,
            )
        return len(found)

    def set_payload(self, payloads: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge keys into stored points' payloads, `batch_size` points a request; see `Store.set_payload`."""
        self._manifest()
        updates = self.checked_payload_updates(payloads)
        written = keyword_fields_in(updates)
        if written:
            indexed = self._call("get_collection", self.client.get_collection, self.collection).payload_schema
            self._create_keyword_indexes(sorted(written - set(indexed or {})))
        operations = [
            models.SetPayloadOperation(set_payload=models.SetPayload(payload=payload, points=[point_id]))
            for point_id, payload in updates.items()
        ]
        for start in range(0, len(operations), self.batch_size):
            self._call(
                "batch_update_points", self.client.batch_update_points, self.collection,
                update_operations=operations[start : start + self.batch_size], wait=True,
            )

    # --- reads --------------------------------------------------------------------------------

    def search(
        self, vector: np.ndarray, using: VectorName, k: int, filter: PayloadFilter | None = None
    ) -> list[Hit]:
        manifest = self._manifest()
        using = check_using(using)
        k = check_positive_int(k, "k")
        response = self._call(
            "query_points", self.client.query_points,
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
        k = check_positive_int(k, "k")
        query = query_list(vector, manifest)
        flt = _to_filter(filter)
        depth = fused_prefetch_limit(k)
        response = self._call(
            "query_points", self.client.query_points,
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
            records = self._call(
                "retrieve", self.client.retrieve,
                self.collection, ids=unique[start : start + 1000], with_payload=False, with_vectors=False,
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
            records = self._call(
                "retrieve", self.client.retrieve,
                self.collection, ids=unique[start : start + 1000], with_payload=True, with_vectors=with_vectors,
            )
            for r in records:
                found[str(r.id)] = record_hit(r)
        return [replace(found[c], id=i) for i, c in wanted if c in found]

    def count(self) -> int:
        self._manifest()
        return self._call("count", self.client.count, self.collection, exact=True).count

    def scroll(self, page_size: int = 256, with_vectors: bool = False) -> Iterator[list[Hit]]:
        self._manifest()
        page_size = check_positive_int(page_size, "page_size")
        offset = None
        while True:
            records, offset = self._call(
                "scroll", self.client.scroll, self.collection,
                limit=page_size, offset=offset, with_payload=True, with_vectors=with_vectors,
            )
            if records:
                yield [record_hit(r) for r in records]
            if offset is None:
                return

    # --- internals ----------------------------------------------------------------------------

    def _call(self, what: str, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`method(*args, **kwargs)`, retried on transient errors as `self.requests` says."""
        return call_with_retries(lambda: method(*args, **kwargs), what, self.requests)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the store for collection {self.collection!r} is closed")

    def _manifest(self) -> IndexManifest:
        self._check_open()
        if self.manifest is None:
            raise RuntimeError(f"collection {self.collection!r} holds no index yet; call create(manifest) first")
        return self.manifest

    def _read_manifest(self) -> IndexManifest:
        config = self._call("get_collection", self.client.get_collection, self.collection).config
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


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"grpc_port must be a port number (1-65535), got {port!r}")
    return port


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
