"""The store contract: named `image`/`text` vectors per point, a payload, and a small manifest.

Two implementations meet it: `EdgeStore` (Qdrant Edge, embedded in process, the default) and
`ClientStore` (qdrant-client: a server URL, a cluster, or `":memory:"` for tests). The Index
talks only to this interface.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

VectorName = Literal["image", "text"]
VECTOR_NAMES: tuple[VectorName, ...] = ("image", "text")

#: A payload filter: every key must match; a list value matches any of its items.
PayloadFilter = Mapping[str, Any]


class IndexMismatchError(ValueError):
    """The index was built with another encoder (spec or width) than the one given."""


@dataclass(frozen=True)
class IndexManifest:
    """What an index records about itself, so queries are never embedded by another model."""

    encoder_spec: str
    dim: int
    distance: str = "cosine"
    format_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IndexManifest":
        known = {k: data[k] for k in ("encoder_spec", "dim", "distance", "format_version") if k in data}
        return cls(**known)


@dataclass
class Point:
    """One item to write: a content-derived UUID string, one or both vectors, and its payload."""

    id: str
    vectors: dict[VectorName, np.ndarray]
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """One search result: the point id, its similarity score, its payload (and vectors if asked)."""

    id: str
    score: float
    payload: dict[str, Any]
    vectors: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)


class Store(ABC):
    """A Qdrant collection (or Edge shard) holding mmrag points."""

    #: None until `create` is called on an empty location.
    manifest: IndexManifest | None

    @abstractmethod
    def create(self, manifest: IndexManifest) -> None:
        """Create the collection (named vectors `image` and `text`, cosine) and record `manifest`."""

    @abstractmethod
    def upsert(self, points: Sequence[Point]) -> None:
        """Insert or overwrite points by id.

        All points are checked first; a bad one (NaN, infinite, all-zero or wrong-width vector)
        raises ValueError naming the point, the vector and the problem, and nothing is stored.
        """

    @abstractmethod
    def search(
        self, vector: np.ndarray, using: VectorName, k: int, filter: PayloadFilter | None = None
    ) -> list[Hit]:
        """The k nearest points by the named vector, best first; [] where no point has that vector.

        A query of another width than the index raises ValueError naming both widths and the
        manifest's `encoder_spec`.
        """

    @abstractmethod
    def search_fused(self, vector: np.ndarray, k: int, filter: PayloadFilter | None = None) -> list[Hit]:
        """Nearest by `image` and by `text`, merged by reciprocal-rank fusion."""

    @abstractmethod
    def existing(self, ids: Sequence[str]) -> set[str]:
        """The subset of `ids` already stored."""

    @abstractmethod
    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[Hit]:
        """Stored points by id (score 1.0), in the order given; missing ids are left out.

        `with_vectors` also returns each point's stored named vectors (for MMR, say), float32.
        """

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> int:
        """Delete points by id; returns how many existed."""

    @abstractmethod
    def count(self) -> int:
        """Exact number of points."""

    @abstractmethod
    def scroll(self, page_size: int = 256, with_vectors: bool = False) -> Iterator[list[Hit]]:
        """Every stored point (score 1.0), a page of at most `page_size` at a time, in id order.

        Pages are fetched as they are consumed, so memory stays bounded by one page; writing
        payload (`set_payload`) while scrolling is safe, adding or deleting points may be missed.
        """

    @abstractmethod
    def set_payload(self, payloads: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge `{id: {key: value}}` into stored points' payloads; vectors and other keys stay as they are.

        A key given replaces that key's whole value. Ids the store lacks raise KeyError naming
        them, before anything is written. A key in INDEXED_KEYWORD_FIELDS gets its keyword index
        here if the collection predates it.
        """

    def checked_payload_updates(self, payloads: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """What `set_payload` checks before it writes: valid `{id: payload}`, every id stored.

        Raises ValueError for a malformed mapping and KeyError naming ids the store lacks (a few,
        then a count), so nothing is written when any update would fail.
        """
        updates = check_payloads(payloads)
        missing = set(updates) - self.existing(list(updates))
        if missing:
            shown = sorted(missing)[:5]
            more = f" and {len(missing) - len(shown)} more" if len(missing) > len(shown) else ""
            raise KeyError(f"no stored point with id {', '.join(shown)}{more}; nothing was written")
        return updates

    def flush(self) -> None:
        """Make writes durable (a no-op where the backend is already durable)."""

    def close(self) -> None:
        """Release files or connections."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- helpers shared by the backends -------------------------------------------------------------

#: Reciprocal-rank-fusion constant: score = sum over lists of 1 / (RRF_K + rank), rank from 0.
#: 2 is Qdrant's own default (server and qdrant-client's local mode), so `ClientStore` can send a
#: plain `FusionQuery(fusion=RRF)` that older servers understand and `EdgeStore` passes the same k.
RRF_K = 2

#: Payload fields both backends put a keyword index on. Filtering on any other key works too
#: (unindexed fields are matched by scanning), these just make the common filters cheap.
#: `tags` is written by `mmrag.tagging` after ingest (see `set_payload`).
INDEXED_KEYWORD_FIELDS: tuple[str, ...] = ("modality", "uri", "tags")

FilterValue = str | int | bool


def fused_prefetch_limit(k: int) -> int:
    """How many candidates each prefetch (image, text) brings to the fusion for a top-`k` query."""
    return max(4 * k, 20)


def check_manifest(manifest: IndexManifest) -> None:
    """ValueError unless `manifest` is one both backends can create: positive width, cosine."""
    if not isinstance(manifest, IndexManifest):
        raise ValueError(f"manifest must be an IndexManifest, got {type(manifest).__name__}")
    if isinstance(manifest.dim, bool) or not isinstance(manifest.dim, int) or manifest.dim < 1:
        raise ValueError(f"manifest.dim must be a positive integer, got {manifest.dim!r}")
    if manifest.distance != "cosine":
        raise ValueError(f"only cosine distance is supported, got {manifest.distance!r}")


def check_payloads(payloads: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """`{id: payload}` with canonical ids and non-empty mappings of string keys, or ValueError."""
    if not isinstance(payloads, Mapping):
        raise ValueError(f"payloads must be a mapping of id -> payload, got {type(payloads).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for point_id, payload in payloads.items():
        if not isinstance(payload, Mapping) or not payload or not all(isinstance(k, str) and k for k in payload):
            raise ValueError(f"payload for {point_id} must be a non-empty mapping with string keys, got {payload!r}")
        out[canonical_id(point_id)] = dict(payload)
    return out


def check_positive_int(value: int, name: str) -> int:
    """`value` (a `k`, a `page_size`) as a positive int, or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_using(using: str) -> VectorName:
    if using not in VECTOR_NAMES:
        raise ValueError(f"using must be one of {VECTOR_NAMES}, got {using!r}")
    return using  # type: ignore[return-value]


def canonical_id(point_id: str) -> str:
    """The canonical (lowercase, hyphenated) form of a UUID string id, or ValueError."""
    if not isinstance(point_id, str):
        raise ValueError(f"point ids are UUID strings, got {type(point_id).__name__} {point_id!r}")
    try:
        return str(uuid.UUID(point_id))
    except ValueError:
        raise ValueError(f"point ids are UUID strings, got {point_id!r}") from None


def _vector(vector: Any, manifest: IndexManifest, what: str) -> np.ndarray:
    """`vector` as 1-d float32 of the index's width, or ValueError naming both widths and the encoder."""
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-d vector, got shape {tuple(arr.shape)}")
    if arr.shape[0] != manifest.dim:
        raise ValueError(
            f"{what} has width {arr.shape[0]}, but the index holds width {manifest.dim} "
            f"(encoder_spec {manifest.encoder_spec!r}); embed with that encoder or build a new index"
        )
    return arr


def query_list(vector: Any, manifest: IndexManifest) -> list[float]:
    """A query vector checked (width, finite) as a list of Python floats, or ValueError."""
    arr = _vector(vector, manifest, "query vector")
    if not np.all(np.isfinite(arr)):
        raise ValueError("query vector contains NaN or infinite values")
    return arr.tolist()


def point_vectors(point: Point, manifest: IndexManifest) -> dict[str, list[float]]:
    """A point's named vectors as lists, or ValueError naming the point, the vector and the problem.

    Checked: known names, at least one, the index's width, no NaN or infinity and not all zero
    (cosine is undefined for a zero vector; the engines would store it and score it 0 forever).
    """
    if not point.vectors:
        raise ValueError(f"point {point.id} has no vectors; give `image`, `text` or both")
    unknown = set(point.vectors) - set(VECTOR_NAMES)
    if unknown:
        raise ValueError(f"point {point.id} has unknown vector names {sorted(unknown)}; use {VECTOR_NAMES}")
    out: dict[str, list[float]] = {}
    for name, vector in point.vectors.items():
        what = f"point {point.id} vector {name!r}"
        arr = _vector(vector, manifest, what)
        if np.isnan(arr).any():
            raise ValueError(f"{what} contains NaN")
        if np.isinf(arr).any():
            raise ValueError(f"{what} contains infinite values")
        if not arr.any():
            raise ValueError(f"{what} is a zero vector, which has no direction for cosine similarity")
        out[name] = arr.tolist()
    return out


def filter_conditions(filter: PayloadFilter | None) -> list[tuple[str, FilterValue | list[str] | list[int]]]:
    """A payload filter checked and flattened to (key, value) pairs, all of which must match.

    A scalar value (str, int or bool) means "equals"; a list (or tuple/set) of str or of int means
    "equals any of" (an empty list matches nothing). Keys may be dotted paths into nested payload
    (`"meta.author"`); a list in the payload matches if any of its items does. Floats, None and
    mixed or boolean lists are rejected here, since Qdrant matches only keywords, integers and
    booleans exactly.
    """
    if filter is None:
        return []
    if not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a mapping of payload key -> value, got {type(filter).__name__}")
    out: list[tuple[str, FilterValue | list[str] | list[int]]] = []
    for key, value in filter.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"filter keys must be non-empty strings, got {key!r}")
        if isinstance(value, (list, tuple, set, frozenset)):
            items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
            if all(isinstance(v, str) for v in items):
                out.append((key, [str(v) for v in items]))
            elif all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items):
                out.append((key, [int(v) for v in items]))
            else:
                raise ValueError(
                    f"filter {key!r}: a list must hold only strings or only integers, got {value!r}"
                )
        elif isinstance(value, (bool, np.bool_)):
            out.append((key, bool(value)))
        elif isinstance(value, (str, int, np.integer)):
            out.append((key, value if isinstance(value, str) else int(value)))
        else:
            raise ValueError(
                f"filter {key!r}: values must be str, int, bool or a list of str/int, got {value!r}"
            )
    return out


def record_vectors(vector: Any) -> dict[str, np.ndarray]:
    """A retrieved record's named vectors as float32 arrays (engines return lists or None)."""
    return {name: np.asarray(v, dtype=np.float32) for name, v in vector.items()} if isinstance(vector, dict) else {}


def record_hit(record: Any) -> Hit:
    """A retrieved or scrolled record (qdrant-client's or Qdrant Edge's) as a Hit of score 1.0."""
    return Hit(str(record.id), 1.0, dict(record.payload or {}), record_vectors(record.vector))


def keyword_fields_in(updates: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The INDEXED_KEYWORD_FIELDS that payload updates write (they need a keyword index)."""
    return {key for payload in updates.values() for key in payload} & set(INDEXED_KEYWORD_FIELDS)
