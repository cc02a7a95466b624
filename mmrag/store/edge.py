"""`EdgeStore`: the embedded default, a Qdrant Edge shard (the Rust engine, in process) in a directory.

Layout of an index directory::

    DIR/manifest.json   the IndexManifest, plus `count` and `updated_at` (written on create/flush/close)
    DIR/shard/          the EdgeShard: segments, write-ahead log, its own edge_config.json
    DIR/.lock           an advisory lock held while a process has the directory open

Only one process may open a shard at a time (the engine locks its WAL); `EdgeStore` takes its own
lock first so the error says what happened. Inside one process, every `EdgeStore` on the same
directory (say an ingest and a retriever) shares one engine, reference-counted, so writes through
one are seen by the others at once and the shard closes with the last handle. Every update goes
through the shard's write-ahead log, so writes survive a crash even without `flush`; `close`
flushes segments and the manifest.

Search speed: Qdrant Edge runs no background optimizer, so points stay in a plain segment that
every search scans in full until the shard is optimized. `flush()` (which `Index.add` calls at its
end) runs the optimizer, which builds the HNSW graph and the quantized copy of the vectors once a
segment passes the engine's indexing threshold (about 5,000 points of 512-d); smaller shards stay
exact scans, which are fast at that size. `EdgeOptions` holds the graph, quantization and search
settings; the defaults were chosen by `tests/bench/search.py` (docs/benchmarks.md, "Search").
"""

from __future__ import annotations

import json
import os
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from qdrant_edge import (
    BinaryQuantizationConfig,
    CountRequest,
    Distance,
    EdgeConfig,
    EdgeShard,
    EdgeVectorParams,
    FieldCondition,
    Filter,
    Fusion,
    HnswIndexConfig,
    MatchAny,
    MatchValue,
    PayloadSchemaType,
    Prefetch,
    QuantizationSearchParams,
    Query,
    QueryRequest,
    ScalarQuantizationConfig,
    ScalarType,
    ScrollRequest,
    SearchParams,
    UpdateOperation,
)
from qdrant_edge import Point as EdgePoint

from .base import (
    INDEXED_KEYWORD_FIELDS,
    RRF_K,
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

try:  # POSIX advisory locks; elsewhere the engine's own WAL lock is the only guard
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shard"
LOCK_FILE = ".lock"


class StoreLockedError(RuntimeError):
    """The index directory is open in another process (Qdrant Edge allows one at a time)."""


Quantization = Literal["int8", "binary"]


@dataclass(frozen=True)
class EdgeOptions:
    """How an Edge index builds its search structures, and how searches use them.

    Build settings (`m`, `ef_construct`, `quantization`) are written into the shard when it is
    created and kept by it: opening an existing index uses the shard's own, whatever is given
    here. Search settings (`hnsw_ef`, `oversampling`, `rescore`) apply to every search through
    the handle. `optimize_on_flush=False` leaves optimizing to explicit `optimize()` calls (each
    search then scans the unindexed points in full). Defaults and the alternatives measured:
    docs/benchmarks.md, "Search".
    """

    #: HNSW graph: edges per node (Qdrant's default 16).
    m: int = 32
    #: HNSW graph: candidates kept while inserting a node; build time grows with it (Qdrant's default 100).
    ef_construct: int = 200
    #: A compressed copy searched first ("int8": 4x smaller, "binary": 32x), or None (Qdrant's default).
    quantization: Quantization | None = "int8"
    #: Candidates kept while searching the graph (None: the engine's default, `ef_construct`).
    hnsw_ef: int | None = 128
    #: With quantization: how many more candidates than k the compressed search returns for rescoring.
    oversampling: float | None = 2.0
    #: With quantization: rescore those candidates with the original float32 vectors.
    rescore: bool = True
    #: Build the index (HNSW graph, quantized copy) in `flush()` once enough points are unindexed.
    optimize_on_flush: bool = True

    def __post_init__(self) -> None:
        for name in ("m", "ef_construct", "hnsw_ef"):
            value = getattr(self, name)
            if value is None and name == "hnsw_ef":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.quantization not in (None, "int8", "binary"):
            raise ValueError(f"quantization must be 'int8', 'binary' or None, got {self.quantization!r}")
        if self.oversampling is not None and (
            isinstance(self.oversampling, bool) or not isinstance(self.oversampling, (int, float))
            or not self.oversampling >= 1
        ):
            raise ValueError(f"oversampling must be a number >= 1 or None, got {self.oversampling!r}")

    def hnsw_config(self) -> HnswIndexConfig:
        # full_scan_threshold (KB) is Qdrant's default: segments under it are scanned, not walked
        return HnswIndexConfig(m=self.m, ef_construct=self.ef_construct, full_scan_threshold=10_000)

    def quantization_config(self) -> ScalarQuantizationConfig | BinaryQuantizationConfig | None:
        if self.quantization == "int8":
            return ScalarQuantizationConfig(type=ScalarType.Int8)
        if self.quantization == "binary":
            return BinaryQuantizationConfig()
        return None

    def search_params(self) -> SearchParams:
        quantization = QuantizationSearchParams(rescore=self.rescore, oversampling=self.oversampling)
        return SearchParams(hnsw_ef=self.hnsw_ef, quantization=quantization)


def _locked_message(path: Path) -> str:
    return (
        f"{path} is locked: it is open in another process, and an embedded Qdrant Edge index can be "
        "opened by one process at a time. Close the other process, or run a Qdrant server and open "
        "the index by URL (open_store('http://host:6333')) to share it between processes."
    )


class _Engine:
    """One index directory opened in this process: the shard, its manifest and the directory lock.

    Shared by every `EdgeStore` on the same resolved path; `refs` counts them. All state changes
    happen under `_ENGINES_LOCK`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest: IndexManifest | None = None
        self.shard: EdgeShard | None = None
        self.lock_fd: int | None = None
        self.refs = 0

    def open(self) -> None:
        """Load the shard if the directory holds an index; leave `manifest` None if it holds none."""
        manifest_path = self.path / MANIFEST_FILE
        shard_path = self.path / SHARD_DIR
        if not manifest_path.exists():
            if shard_path.exists() and any(shard_path.iterdir()):
                raise ValueError(
                    f"{self.path} holds a shard but no {MANIFEST_FILE}: it was not (fully) created "
                    "by mmrag. Remove the directory and build the index again."
                )
            return
        manifest = _read_manifest(manifest_path)
        if not shard_path.is_dir():
            raise ValueError(f"{self.path} has a {MANIFEST_FILE} but no {SHARD_DIR}/ directory")
        self.acquire_lock()
        try:
            self.shard = _load_shard(shard_path, self.path)
        except BaseException:
            self.release_lock()
            raise
        self.manifest = manifest

    def create(self, manifest: IndexManifest, options: EdgeOptions) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.acquire_lock()
        try:
            config = EdgeConfig(
                vectors={
                    name: EdgeVectorParams(size=manifest.dim, distance=Distance.Cosine) for name in VECTOR_NAMES
                },
                hnsw_config=options.hnsw_config(),
                quantization_config=options.quantization_config(),
                wal_enabled=True,
            )
            shard = _create_shard(self.path / SHARD_DIR, config, self.path)
            for name in INDEXED_KEYWORD_FIELDS:
                shard.update(UpdateOperation.create_field_index(name, PayloadSchemaType.Keyword))
            shard.flush()
        except BaseException:
            self.release_lock()
            raise
        self.shard = shard
        self.manifest = manifest
        self.write_manifest()

    def flush(self) -> None:
        if self.shard is not None:
            self.shard.flush()
            self.write_manifest()

    def close(self) -> None:
        shard, self.shard = self.shard, None
        try:
            if shard is not None:
                try:
                    shard.flush()
                    self.write_manifest(shard)
                finally:
                    shard.close()
        finally:
            self.release_lock()

    def write_manifest(self, shard: EdgeShard | None = None) -> None:
        shard = shard or self.shard
        if self.manifest is None or shard is None:
            return
        data = {
            **self.manifest.to_dict(),
            "count": shard.count(CountRequest(exact=True)),
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        target = self.path / MANIFEST_FILE
        tmp = target.with_name(f"{MANIFEST_FILE}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, target)

    def acquire_lock(self) -> None:
        if self.lock_fd is not None or fcntl is None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(_locked_message(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        self.lock_fd = fd

    def release_lock(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)  # type: ignore[union-attr]
            os.close(fd)


#: Open engines by resolved absolute path, and the lock that guards them and their state changes.
_ENGINES: dict[Path, _Engine] = {}
_ENGINES_LOCK = threading.RLock()


def _acquire_engine(path: Path) -> _Engine:
    with _ENGINES_LOCK:
        engine = _ENGINES.get(path) or _Engine(path)
        if engine.shard is None:
            engine.open()  # first handle, or every handle so far saw an empty directory
        engine.refs += 1
        _ENGINES[path] = engine
        return engine


def _release_engine(engine: _Engine) -> None:
    """Drop one handle: flush, and close the shard and the lock with the last one."""
    with _ENGINES_LOCK:
        engine.refs -= 1
        if engine.refs > 0:
            engine.flush()
            return
        _ENGINES.pop(engine.path, None)
        engine.close()


class EdgeStore(Store):
    """A `Store` over a Qdrant Edge shard in `path`.

    `EdgeStore(path)` opens an existing index, or leaves `manifest` None for a missing or empty
    directory until `create(manifest)` is called. Use it as a context manager, or call `close()`:
    the directory stays locked to this process until its last handle here is closed (or garbage
    collected). Handles on the same directory in one process share one engine. `options` sets
    the HNSW graph and quantization of a shard this handle creates, and this handle's searches
    (see `EdgeOptions`).
    """

    #: Points per upsert operation.
    batch_size: int = 256

    def __init__(self, path: str | os.PathLike[str], options: EdgeOptions | None = None) -> None:
        if options is not None and not isinstance(options, EdgeOptions):
            raise ValueError(f"options must be an EdgeOptions, got {type(options).__name__}")
        self.options = options or EdgeOptions()
        self._search_params = self.options.search_params()
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file; an Edge index is a directory")
        self._engine: _Engine | None = _acquire_engine(self.path.resolve())
        self._closed_manifest: IndexManifest | None = None
        # releases this handle's reference if it is dropped without close(), and at exit
        self._release = weakref.finalize(self, _release_engine, self._engine)

    @property
    def manifest(self) -> IndexManifest | None:  # type: ignore[override]
        """The index's manifest (shared with other handles here), None before `create`."""
        return self._engine.manifest if self._engine is not None else self._closed_manifest

    # --- lifecycle ----------------------------------------------------------------------------

    def create(self, manifest: IndexManifest) -> None:
        """Create the shard (`image` and `text`, cosine, width `manifest.dim`, this handle's build
        options) and write the manifest.

        On an index that already exists this is a no-op when `manifest` matches the stored one
        and raises `IndexMismatchError` when it does not.
        """
        check_manifest(manifest)
        engine = self._open_engine()
        with _ENGINES_LOCK:
            if engine.manifest is not None:
                if engine.manifest != manifest:
                    raise IndexMismatchError(
                        f"{self.path} already holds an index built with {engine.manifest}; got {manifest}"
                    )
                return
            engine.create(manifest, self.options)

    def flush(self) -> None:
        """Flush segments to disk and refresh the manifest's count (the WAL already holds every write).

        With `options.optimize_on_flush` (the default), first build the HNSW graph and quantized
        vectors for points written since the last build, once there are enough of them for the
        engine's indexing threshold; below it this costs nothing.
        """
        engine = self._engine
        if engine is None:
            return
        if self.options.optimize_on_flush and engine.shard is not None:
            engine.shard.optimize()  # outside the global lock: it can take minutes on a bulk load
        with _ENGINES_LOCK:
            engine.flush()

    def optimize(self) -> bool:
        """Merge segments and build the HNSW graph and quantized vectors now; True if anything changed."""
        changed = self._live().optimize()
        with _ENGINES_LOCK:
            self._open_engine().flush()
        return changed

    def close(self) -> None:
        """Flush and drop this handle; the last one on the directory closes the shard. Safe to call twice."""
        if self._engine is None:
            return
        self._closed_manifest = self._engine.manifest
        self._engine = None
        self._release()

    # --- writes -------------------------------------------------------------------------------

    def upsert(self, points: Sequence[Point]) -> None:
        """Insert or overwrite points by id, in batches of `batch_size`.

        Every point is checked before the first write, so a batch with one bad vector (NaN,
        infinite, all zero, wrong width) raises ValueError and stores nothing.
        """
        shard = self._live()
        manifest = self.manifest
        prepared = [
            EdgePoint(id=canonical_id(p.id), vector=point_vectors(p, manifest), payload=dict(p.payload))
            for p in points
        ]
        for start in range(0, len(prepared), self.batch_size):
            shard.update(UpdateOperation.upsert_points(prepared[start : start + self.batch_size]))

    def delete(self, ids: Sequence[str]) -> int:
        """Delete points by id; returns how many of them existed."""
        shard = self._live()
        found = sorted({canonical_id(i) for i in self.existing(ids)})
        for start in range(0, len(found), self.batch_size):
            shard.update(UpdateOperation.delete_points(found[start : start + self.batch_size]))
        return len(found)

    def set_payload(self, payloads: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge keys into stored points' payloads (one engine operation a point); see `Store.set_payload`."""
        shard = self._live()
        updates = self.checked_payload_updates(payloads)
        indexed = set(shard.info().payload_schema)
        for name in sorted(keyword_fields_in(updates) - indexed):
            shard.update(UpdateOperation.create_field_index(name, PayloadSchemaType.Keyword))
        for point_id, payload in updates.items():
            shard.update(UpdateOperation.set_payload([point_id], payload))

    # --- reads --------------------------------------------------------------------------------

    def search(
        self, vector: np.ndarray, using: VectorName, k: int, filter: PayloadFilter | None = None
    ) -> list[Hit]:
        shard = self._live()
        using = check_using(using)
        k = check_positive_int(k, "k")
        query = query_list(vector, self.manifest)  # type: ignore[arg-type]
        request = QueryRequest(
            limit=k,
            query=Query.Nearest(query, using=using),
            filter=_to_filter(filter),
            params=self._search_params,
            with_payload=True,
            with_vector=False,
        )
        return [_hit(p) for p in shard.query(request)]

    def search_fused(self, vector: np.ndarray, k: int, filter: PayloadFilter | None = None) -> list[Hit]:
        shard = self._live()
        k = check_positive_int(k, "k")
        query = query_list(vector, self.manifest)  # type: ignore[arg-type]
        flt = _to_filter(filter)
        depth = fused_prefetch_limit(k)
        request = QueryRequest(
            # every candidate, so ties are cut the same way on every backend (below)
            limit=2 * depth,
            prefetches=[
                Prefetch(limit=depth, query=Query.Nearest(query, using=name), filter=flt, params=self._search_params)
                for name in VECTOR_NAMES
            ],
            query=Fusion.Rrf(k=RRF_K),
            with_payload=True,
            with_vector=False,
        )
        hits = [_hit(p) for p in shard.query(request)]
        hits.sort(key=lambda h: (-h.score, h.id))
        return hits[:k]

    def existing(self, ids: Sequence[str]) -> set[str]:
        """The subset of `ids` (as given) already stored."""
        shard = self._live()
        wanted = {i: canonical_id(i) for i in ids}
        unique = sorted(set(wanted.values()))
        found: set[str] = set()
        for start in range(0, len(unique), 1000):
            records = shard.retrieve(unique[start : start + 1000], with_payload=False, with_vector=False)
            found.update(str(r.id) for r in records)
        return {i for i, c in wanted.items() if c in found}

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[Hit]:
        """Stored points by id (score 1.0), in the order given; missing ids are left out."""
        shard = self._live()
        wanted = [(i, canonical_id(i)) for i in ids]
        unique = sorted({c for _, c in wanted})
        found: dict[str, Hit] = {}
        for start in range(0, len(unique), 1000):
            for r in shard.retrieve(unique[start : start + 1000], with_payload=True, with_vector=with_vectors):
                found[str(r.id)] = record_hit(r)
        return [replace(found[c], id=i) for i, c in wanted if c in found]

    def count(self) -> int:
        return self._live().count(CountRequest(exact=True))

    def scroll(self, page_size: int = 256, with_vectors: bool = False) -> Iterator[list[Hit]]:
        page_size = check_positive_int(page_size, "page_size")
        offset = None
        while True:
            request = ScrollRequest(offset=offset, limit=page_size, with_payload=True, with_vector=with_vectors)
            records, offset = self._live().scroll(request)
            if records:
                yield [record_hit(r) for r in records]
            if offset is None:
                return

    # --- internals ----------------------------------------------------------------------------

    def _open_engine(self) -> _Engine:
        if self._engine is None:
            raise RuntimeError(f"the Edge index at {self.path} is closed")
        return self._engine

    def _live(self) -> EdgeShard:
        shard = self._open_engine().shard
        if shard is None:
            raise RuntimeError(f"{self.path} holds no index yet; call create(manifest) first")
        return shard

    def __repr__(self) -> str:
        state = "closed" if self._engine is None else "open"
        return f"EdgeStore({str(self.path)!r}, manifest={self.manifest!r}, {state})"


def _read_manifest(path: Path) -> IndexManifest:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return IndexManifest.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read the index manifest {path}: {exc}") from exc


def _engine_error(exc: Exception, index_path: Path) -> Exception:
    """Turn the engine's WAL lock failure (a bare Exception) into a StoreLockedError."""
    if "WouldBlock" in str(exc) or "Resource temporarily unavailable" in str(exc):
        return StoreLockedError(_locked_message(index_path))
    return exc


def _load_shard(shard_path: Path, index_path: Path) -> EdgeShard:
    try:
        return EdgeShard.load(str(shard_path))
    except Exception as exc:
        err = _engine_error(exc, index_path)
        if err is exc:
            raise
        raise err from exc


def _create_shard(shard_path: Path, config: EdgeConfig, index_path: Path) -> EdgeShard:
    try:
        return EdgeShard.create(str(shard_path), config)
    except Exception as exc:
        err = _engine_error(exc, index_path)
        if err is exc:
            raise
        raise err from exc


def _match(value: Any) -> MatchValue | MatchAny:
    if isinstance(value, list):
        return MatchAny(value)
    if isinstance(value, bool):
        # qdrant-edge-py 0.9.0 turns a Python bool into the integer 1/0 (bool is an int subclass,
        # and Integer is tried first), which never matches a boolean payload; numpy's bool is not
        # an int, so it reaches the Bool variant.
        return MatchValue(np.bool_(value))
    return MatchValue(value)


def _to_filter(filter: PayloadFilter | None) -> Filter | None:
    conditions = filter_conditions(filter)
    if not conditions:
        return None
    return Filter(must=[FieldCondition(key=key, match=_match(value)) for key, value in conditions])


def _hit(point: Any) -> Hit:
    return Hit(id=str(point.id), score=float(point.score), payload=dict(point.payload or {}))
