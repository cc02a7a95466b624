"""LangChain bridge: a retriever over an `mmrag.Index`, an `Embeddings` adapter, and a search tool.

    from mmrag.integrations.langchain import MultimodalRetriever, MultimodalEmbeddings
    retriever = MultimodalRetriever(index=index, k=4, target="both")
    chain = retriever | format_docs | prompt | model

Needs the `langchain` extra (`pip install 'mmrag[langchain]'`). Query strings follow
`mmrag.agent.resolve_query`: base64 `data:image/...` URIs, `http(s)://` URLs (fetched with a timeout
and a size cap), existing image paths, and text for everything else.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables.config import run_in_executor
    from langchain_core.tools import StructuredTool
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mmrag.integrations.langchain needs langchain-core; install it with pip install 'mmrag[langchain]'"
    ) from exc
from pydantic import ConfigDict, Field

from mmrag.agent import (
    DEFAULT_TOOL_DESCRIPTION,
    DEFAULT_TOOL_NAME,
    FETCH_TIMEOUT_S,
    MAX_FETCH_BYTES,
    is_data_uri,
    is_url,
    search_tool,
    tool_schema,
)
from mmrag.agent import resolve_query as _resolve_query
from mmrag.encoders import Encoder, load_encoder
from mmrag.index import Index, SearchHit
from mmrag.media import load_image
from mmrag.store import Store

__all__ = ["MultimodalEmbeddings", "MultimodalRetriever", "index_tool", "stored_vectors"]


class MultimodalRetriever(BaseRetriever):
    """A LangChain retriever over an already-open `mmrag.Index`.

    The query is text or an image (path, http(s) URL, `data:` URI, bytes, PIL image). Each
    `Document` holds the item's captions (or its text) as `page_content`, and `id`, `source` (the
    URI), `score`, `modality` and `payload` in `metadata`. Images are referenced by URI; set
    `inline_images=True` to also put the file's bytes in `metadata["image_base64"]`.

    `k`, `target`, `filter`, `score_threshold`, `search_type`, `fetch_k` and `lambda_mult` can also
    be given per call: `retriever.invoke("a dog", k=3, filter={"split": "dev"})`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Index
    k: int = Field(default=4, ge=1)
    #: Which stored vectors to compare with; "both" fuses the two rankings by reciprocal rank.
    target: Literal["image", "text", "both"] = "image"
    filter: dict[str, Any] | None = None
    #: Drop hits scoring below this. Cosine for "image"/"text"; for "both" an RRF score (small).
    score_threshold: float | None = None
    search_type: Literal["similarity", "mmr"] = "similarity"
    #: MMR: how many nearest candidates to rerank, and relevance (1.0) versus diversity (0.0).
    fetch_k: int = Field(default=20, ge=1)
    lambda_mult: float = Field(default=0.5, ge=0.0, le=1.0)
    inline_images: bool = False
    #: http(s) image queries: fetched at all, within how long, and up to how many bytes.
    fetch_urls: bool = True
    fetch_timeout: float = Field(default=FETCH_TIMEOUT_S, gt=0)
    max_fetch_bytes: int = Field(default=MAX_FETCH_BYTES, ge=1)

    def _get_relevant_documents(
        self, query: Any, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        options = self._options(kwargs)
        resolved = _resolve_query(
            query, fetch_urls=self.fetch_urls, timeout=self.fetch_timeout, max_bytes=self.max_fetch_bytes
        )
        if options["search_type"] == "mmr":
            hits = _mmr_search(self.index, resolved, options)
        else:
            hits = self.index.search(resolved, k=options["k"], target=options["target"], filter=options["filter"])
        threshold = options["score_threshold"]
        if threshold is not None:
            hits = [hit for hit in hits if hit.score >= threshold]
        return [self._document(hit, options["target"]) for hit in hits]

    async def _aget_relevant_documents(
        self, query: Any, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        # The base class runs the sync path in the executor too, but drops per-call kwargs (k, filter).
        return await run_in_executor(
            None, self._get_relevant_documents, query, run_manager=run_manager.get_sync(), **kwargs
        )

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        names = ("k", "target", "filter", "score_threshold", "search_type", "fetch_k", "lambda_mult")
        unknown = set(overrides) - set(names)
        if unknown:
            raise TypeError(f"unknown retriever options {sorted(unknown)}; known: {list(names)}")
        options = {name: overrides.get(name, getattr(self, name)) for name in names}
        k = options["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if options["search_type"] not in ("similarity", "mmr"):
            raise ValueError(f"search_type must be 'similarity' or 'mmr', got {options['search_type']!r}")
        if not 0.0 <= float(options["lambda_mult"]) <= 1.0:
            raise ValueError(f"lambda_mult must be in [0, 1], got {options['lambda_mult']!r}")
        return options

    def _document(self, hit: SearchHit, target: str) -> Document:
        metadata: dict[str, Any] = {
            "id": hit.id,
            "source": hit.uri,
            "score": float(hit.score),
            "modality": hit.modality,
            "target": target,
            "payload": dict(hit.payload),
        }
        if self.inline_images and hit.modality == "image" and hit.uri and Path(hit.uri).is_file():
            metadata["image_base64"] = base64.b64encode(Path(hit.uri).read_bytes()).decode("ascii")
            metadata["mime_type"] = mimetypes.guess_type(hit.uri)[0] or "application/octet-stream"
        return Document(page_content="\n".join(hit.captions), metadata=metadata, id=hit.id)


class MultimodalEmbeddings(Embeddings):
    """LangChain `Embeddings` through any mmrag tower; a drop-in for `OpenCLIPEmbeddings`.

    `encoder` is a spec string (`"openclip:ViT-B-32@/path/ckpt.pt"`), an `Encoder`, or None for
    the default tower. A spec loads on first use (or `load()`), never at construction.
    `embed_image(uris)` is an mmrag extension, as in `OpenCLIPEmbeddings`: paths, http(s) URLs or
    `data:` URIs, embedded in batches.
    """

    def __init__(self, encoder: str | Encoder | None = None, *, batch_size: int = 32, device: str = "cpu") -> None:
        if encoder is not None and not isinstance(encoder, (str, Encoder)):
            raise TypeError(f"encoder must be a spec string or an mmrag Encoder, got {type(encoder).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.spec = encoder.spec if isinstance(encoder, Encoder) else encoder
        self.batch_size = batch_size
        self.device = device
        self._encoder = encoder if isinstance(encoder, Encoder) else None
        self._lock = threading.Lock()

    @property
    def encoder(self) -> Encoder:
        """The tower, loaded on first use (once, even under concurrent async calls)."""
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    self._encoder = load_encoder(self.spec, device=self.device)
        return self._encoder

    def load(self) -> "MultimodalEmbeddings":
        """Load the tower now rather than on the first call."""
        _ = self.encoder
        return self

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return self.encoder.embed_texts(list(texts), batch_size=self.batch_size).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.encoder.embed_texts([text])[0].tolist()

    def embed_image(self, uris: Sequence[str | Path]) -> list[list[float]]:
        """Image embeddings in the texts' space; each uri is a path, an http(s) URL or a data URI."""
        if not uris:
            return []
        images = [load_image(_image_source(uri)) for uri in uris]
        return self.encoder.embed_images(images, batch_size=self.batch_size).tolist()

    def __repr__(self) -> str:
        return f"MultimodalEmbeddings({self.spec!r}, loaded={self._encoder is not None})"


def _image_source(uri: str | Path) -> Any:
    """A uri for `embed_image`: a data URI or http(s) URL, else a file path (never text)."""
    if isinstance(uri, str) and (is_data_uri(uri.strip()) or is_url(uri.strip())):
        return _resolve_query(uri)
    return Path(uri)


def index_tool(
    index: Index,
    name: str = DEFAULT_TOOL_NAME,
    description: str = DEFAULT_TOOL_DESCRIPTION,
    *,
    fetch_urls: bool = False,
) -> StructuredTool:
    """A LangChain tool over `index` whose arguments schema is `mmrag.agent.tool_schema`.

    The tool answers with JSON text (what a chat model reads) and keeps the result list as the
    message's artifact. URL fetching is off unless `fetch_urls`: the query comes from a model.
    """
    schema = tool_schema(name, description)["function"]["parameters"]

    def run(query: str, k: int = 5, target: str = "image", filters: dict[str, Any] | None = None) -> tuple[str, list]:
        results = search_tool(index, query, k=k, target=target, filters=filters, fetch_urls=fetch_urls)  # type: ignore[arg-type]
        return json.dumps(results), results

    return StructuredTool.from_function(
        func=run, name=name, description=description, args_schema=schema, response_format="content_and_artifact"
    )


# -- MMR over stored vectors ---------------------------------------------------------------------

def stored_vectors(store: Store, ids: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """The stored named vectors of `ids` (id -> {"image": v, "text": v}), without re-embedding."""
    return {hit.id: hit.vectors for hit in store.retrieve(list(ids), with_vectors=True)}


def _mmr_search(index: Index, query: Any, options: dict[str, Any]) -> list[SearchHit]:
    """Maximal marginal relevance over the `fetch_k` nearest candidates, using their stored vectors.

    Relevance and redundancy are cosines between stored vectors (the `target` vector; for "both",
    the image vector where an item has one, else its text vector). The hits keep their search
    scores, so a threshold means the same as without MMR.
    """
    k, target = options["k"], options["target"]
    vector = index.embed_query(query)
    fetch_k = max(int(options["fetch_k"]), k)
    if target == "both":
        raw = index.store.search_fused(vector, fetch_k, options["filter"])
    else:
        raw = index.store.search(vector, target, fetch_k, options["filter"])
    candidates = [SearchHit.from_hit(hit) for hit in raw]
    if len(candidates) <= 1:
        return candidates[:k]
    vectors = stored_vectors(index.store, [hit.id for hit in candidates])
    names = ("image", "text") if target in ("image", "both") else ("text", "image")
    usable, matrix = [], []
    for hit in candidates:
        stored = vectors.get(hit.id, {})
        chosen = next((stored[name] for name in names if name in stored), None)
        if chosen is not None:
            usable.append(hit)
            matrix.append(chosen)
    if not matrix:
        return candidates[:k]
    order = maximal_marginal_relevance(np.asarray(vector, dtype=np.float32), np.stack(matrix), k, options["lambda_mult"])
    return [usable[i] for i in order]


def maximal_marginal_relevance(query: np.ndarray, candidates: np.ndarray, k: int, lambda_mult: float) -> list[int]:
    """Indices of `k` rows of `candidates` picked greedily for relevance to `query` minus redundancy."""
    unit = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    relevance = unit @ (query / np.linalg.norm(query))
    similarity = unit @ unit.T
    chosen = [int(np.argmax(relevance))]
    while len(chosen) < min(k, len(candidates)):
        redundancy = similarity[:, chosen].max(axis=1)
        scores = lambda_mult * relevance - (1.0 - lambda_mult) * redundancy
        scores[chosen] = -np.inf
        chosen.append(int(np.argmax(scores)))
    return chosen
