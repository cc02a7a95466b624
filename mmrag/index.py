"""`Index`: the one object users touch. It owns an encoder and a store, and keeps them matched.

    index = Index.open("photos.mmrag")          # embedded Qdrant Edge in a folder
    index.add("~/Pictures")                      # folder, manifest, list, PIL, bytes, texts
    hits = index.search("a dog on a beach", k=5) # text -> image
    hits = index.search(Path("dog.jpg"), target="both")
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .encoders import DEFAULT_SPEC, Encoder, Precision, Runtime, load_encoder
from .ingest import IngestReport, ingest
from .media import IMAGE_SUFFIXES, load_image
from .sources import Source, count_items, iter_items
from .store import (
    ClusterOptions,
    Hit,
    IndexManifest,
    IndexMismatchError,
    PayloadFilter,
    RequestOptions,
    Store,
    open_store,
)
from .tagging import DEFAULT_THRESHOLD, DEFAULT_TOP, Tagger, TagReport, tag_store

logger = logging.getLogger(__name__)

Target = Literal["image", "text", "both"]
Query = str | Path | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class SearchHit:
    """One result: the point id, its score, where it came from, its captions, and its payload.

    Scores are cosine similarities for `target="image"` or `"text"`, and reciprocal-rank-fusion
    scores (not comparable to cosines) for `target="both"`.
    """

    id: str
    score: float
    uri: str | None
    captions: list[str]
    modality: str
    payload: dict[str, Any] = field(repr=False)

    @classmethod
    def from_hit(cls, hit: Hit) -> "SearchHit":
        payload = hit.payload
        captions = payload.get("captions") or ([payload["text"]] if "text" in payload else [])
        return cls(hit.id, hit.score, payload.get("uri"), list(captions), payload.get("modality", ""), payload)


@dataclass(frozen=True)
class IndexInfo:
    """What `mmrag info` prints."""

    location: str
    encoder_spec: str
    dim: int
    distance: str
    count: int


class Index:
    """An encoder and a Qdrant store that were built for each other."""

    def __init__(self, store: Store, encoder: Encoder, location: str = "") -> None:
        if store.manifest is None:
            store.create(IndexManifest(encoder_spec=encoder.spec, dim=encoder.dim))
        _check_match(store.manifest, encoder, location)
        self.store = store
        self.encoder = encoder
        self.location = location

    @classmethod
    def open(
        cls,
        location: str | Path,
        encoder: str | Encoder | None = None,
        *,
        collection: str = "mmrag",
        api_key: str | None = None,
        prefer_grpc: bool = False,
        grpc_port: int | None = None,
        cluster: ClusterOptions | None = None,
        requests: RequestOptions | None = None,
        precision: Precision = "fp32",
        runtime: Runtime = "torch",
    ) -> "Index":
        """Open or create an index.

        `location` is a folder (embedded Qdrant Edge, created if absent), an `http(s)://` Qdrant
        URL, or `":memory:"`. `encoder` is a spec, an Encoder, or None: the encoder the index
        records, or the default tower for a new index. A different encoder than the recorded
        one raises IndexMismatchError rather than mixing vectors from two models.

        For a URL: `collection`, `api_key`, `prefer_grpc` and `grpc_port` say where and how to
        connect, `cluster` how to lay out a new collection (shards, replicas, write consistency)
        and `requests` how big requests may be and how often to retry (see docs/server.md).
        `precision="bf16"` runs an encoder loaded from a spec in bfloat16 autocast (faster on
        CPUs with AVX512-BF16, embeddings within ~0.005 cosine of fp32); `runtime="onnx"` runs its
        image side in ONNX Runtime (same embeddings, several times faster on a CPU; the `onnx`
        extra). Figures in docs/benchmarks.md.
        """
        store = open_store(
            location, collection=collection, api_key=api_key, prefer_grpc=prefer_grpc, grpc_port=grpc_port,
            cluster=cluster, requests=requests,
        )
        try:
            if isinstance(encoder, str) or encoder is None:
                recorded = store.manifest.encoder_spec if store.manifest else None
                if encoder is not None and recorded is not None and encoder != recorded:
                    raise IndexMismatchError(
                        f"index {location} was built with encoder {recorded!r}, not {encoder!r}; "
                        "open it without an encoder to use the recorded one, or index into a new location"
                    )
                encoder = load_encoder(encoder or recorded or DEFAULT_SPEC, precision=precision, runtime=runtime)
            elif precision != "fp32" or runtime != "torch":
                raise ValueError("precision and runtime apply to an encoder loaded from a spec; "
                                 "call encoder.with_precision() / with_runtime() instead")
            return cls(store, encoder, str(location))
        except BaseException:
            store.close()
            raise

    # -- writing ---------------------------------------------------------------------------------
    def add(
        self,
        source: Source,
        *,
        batch_size: int = 32,
        workers: int | None = None,
        progress: bool = True,
        allow_truncated: bool = False,
    ) -> IngestReport:
        """Index a folder, manifest, list of paths/PIL images/arrays/bytes/texts, or one of them.

        Items already present and unchanged are counted, not re-encoded; a file whose content
        changed replaces its old version. Corrupt, truncated, empty or non-image files are
        skipped and listed in the report; the run goes on. `allow_truncated` indexes truncated
        files (the missing part grey) instead.
        """
        return ingest(
            iter_items(source), self.encoder, self.store, batch_size=batch_size, workers=workers,
            progress=progress, total=count_items(source), allow_truncated=allow_truncated,
        )

    def delete(self, ids: Sequence[str]) -> int:
        """Delete items by id; returns how many existed."""
        return self.store.delete(list(ids))

    def tag(
        self,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        top: int | None = DEFAULT_TOP,
        *,
        progress: bool = True,
    ) -> TagReport:
        """Zero-shot tag every photo: its payload gets `tags` (labels scoring >= `threshold`, best
        first, at most `top`) and `tag_scores` (every label's calibrated score), so that
        `search(..., filter={"tags": "dog"})` works. Scores are calibrated per photo, so one
        threshold holds for any encoder (mmrag.tagging, docs/tagging.md).
        """
        tagger = Tagger.build(self.encoder, labels, templates, threshold, top)
        return tag_store(self.store, tagger, progress=progress)

    # -- reading ---------------------------------------------------------------------------------
    def search(
        self, query: Query, k: int = 10, target: Target = "image", filter: PayloadFilter | None = None
    ) -> list[SearchHit]:
        """The k best items for a text or image query.

        `query`: text, or an image as a `Path`, a str path ending in an image suffix that exists,
        bytes, a PIL image or an array. `target`: compare with items' `image` vectors, their
        `text` vectors (captions and text items), or `both`, fused by reciprocal rank.
        """
        _check_search(k, target)
        return self._search_vector(self.embed_query(query), k, target, filter)

    def similar(
        self, item_id: str, k: int = 10, target: Target = "image", filter: PayloadFilter | None = None
    ) -> list[SearchHit]:
        """More like this: the k items nearest a stored item, the item itself left out.

        The query is the item's stored vector (its image vector, or its text vector for a text
        item), so nothing is decoded or encoded again. KeyError for an id the index lacks.
        """
        _check_search(k, target)
        stored = self.store.retrieve([item_id], with_vectors=True)
        if not stored:
            raise KeyError(item_id)
        vectors = stored[0].vectors
        own = str(uuid.UUID(item_id))
        hits = self._search_vector(vectors["image"] if "image" in vectors else vectors["text"], k + 1, target, filter)
        return [hit for hit in hits if hit.id != own][:k]

    def _search_vector(
        self, vector: np.ndarray, k: int, target: Target, filter: PayloadFilter | None
    ) -> list[SearchHit]:
        if target == "both":
            hits = self.store.search_fused(vector, k, filter)
        else:
            hits = self.store.search(vector, target, k, filter)
        return [SearchHit.from_hit(hit) for hit in hits]

    def embed_query(self, query: Query) -> np.ndarray:
        """The query's vector: a text embedding, or an image embedding for image inputs."""
        if isinstance(query, str) and not _is_image_path(query):
            vector = self.encoder.embed_texts(query)  # raises on empty text, before counting tokens
            tokens = self.encoder.count_tokens([query])[0]
            if tokens > self.encoder.context_length:
                logger.warning("query of %d tokens truncated to the tower's %d", tokens, self.encoder.context_length)
            return vector
        if isinstance(query, str):
            query = Path(query)
        return self.encoder.embed_images(load_image(query))

    def get(self, ids: Sequence[str]) -> list[SearchHit]:
        """Stored items by id, in the order given; unknown ids are left out."""
        return [SearchHit.from_hit(hit) for hit in self.store.retrieve(list(ids))]

    def count(self) -> int:
        return self.store.count()

    def info(self) -> IndexInfo:
        manifest = self.store.manifest
        return IndexInfo(self.location, manifest.encoder_spec, manifest.dim, manifest.distance, self.count())

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({self.location!r}, encoder={self.encoder.spec!r})"

    def as_tool(self, name: str = "mmrag_search", description: str | None = None, *, fetch_urls: bool = False) -> Any:
        """A LangChain tool searching this index (arguments: query, k, target, filters).

        The one deliberate convenience entry point from the core into an integration: it imports
        `mmrag.integrations.langchain` here, on call, so the core never needs LangChain. Without
        LangChain, use `mmrag.agent.search_tool` and `mmrag.agent.tool_schema`.
        """
        from mmrag.integrations.langchain import index_tool

        kwargs = {} if description is None else {"description": description}
        return index_tool(self, name, fetch_urls=fetch_urls, **kwargs)


def _check_match(manifest: IndexManifest, encoder: Encoder, location: str) -> None:
    if manifest.encoder_spec != encoder.spec or manifest.dim != encoder.dim:
        raise IndexMismatchError(
            f"index {location} holds {manifest.dim}-d vectors from {manifest.encoder_spec!r}; "
            f"the encoder given is {encoder.spec!r} ({encoder.dim}-d). Use the recorded encoder or a new index."
        )


def _check_search(k: int, target: str) -> None:
    """Refuse a bad `k` or `target` before any work is done."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if target not in ("image", "text", "both"):
        raise ValueError(f"target must be 'image', 'text' or 'both', got {target!r}")


def _is_image_path(text: str) -> bool:
    """A query string is an image path only if it ends in an image suffix and the file exists."""
    return len(text) < 4096 and Path(text).suffix.lower() in IMAGE_SUFFIXES and Path(text).is_file()
