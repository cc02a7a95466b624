"""mmrag: multimodal retrieval for RAG and generative pipelines.

Dual-encoder towers map images and texts into one space; their embeddings fill a Qdrant store;
`Index` serves it as a text-to-image, image-to-image, image-to-text and hybrid retriever.

    >>> import mmrag
    >>> index = mmrag.Index.open("photos.mmrag")
    >>> report = index.add("~/Pictures")
    >>> index.search("a dog on a beach", k=5)
"""

from .encoders import DEFAULT_SPEC, Encoder, ModelNotFoundError, load_encoder
from .index import Index, IndexInfo, SearchHit
from .ingest import IngestReport, Skipped
from .media import ImageDecodeError, load_image
from .store import IndexMismatchError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SPEC",
    "Encoder",
    "ImageDecodeError",
    "Index",
    "IndexInfo",
    "IndexMismatchError",
    "IngestReport",
    "ModelNotFoundError",
    "SearchHit",
    "Skipped",
    "load_encoder",
    "load_image",
]
