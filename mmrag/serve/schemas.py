"""The API's request and response bodies: pydantic models, so /openapi.json states every field and limit."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .images import THUMBNAIL_SIZE

#: Most results one search returns: a bigger `k` is refused (422), not silently cut.
MAX_K = 100
#: Longest text query or caption accepted, in characters (the tower reads far fewer tokens).
MAX_TEXT_CHARS = 2000

Target = Literal["image", "text", "both"]
#: What Qdrant matches exactly: a keyword, an integer or a boolean, or a list of keywords or of integers.
FilterValue = Union[StrictStr, StrictInt, StrictBool, list[StrictStr], list[StrictInt]]
PayloadFilter = dict[str, FilterValue]

K = Field(10, ge=1, le=MAX_K, description=f"How many results, 1 to {MAX_K}.")
TARGET = Field("image", description="Compare with items' image vectors, their text vectors, or both (fused by rank).")
FILTER = Field(None, description='Payload filter: every key must match; a list matches any of its values. '
                                 'Example: {"split": "val2017", "categories": ["dog", "cat"]}.')


class Strict(BaseModel):
    """Unknown fields are refused, so a misspelt option is an error rather than ignored."""

    model_config = ConfigDict(extra="forbid")


class TextSearch(Strict):
    text: str = Field(..., min_length=1, max_length=MAX_TEXT_CHARS, description="The text query.")
    k: int = K
    target: Target = TARGET
    filter: PayloadFilter | None = FILTER


class SimilarSearch(Strict):
    id: str = Field(..., description="Id of an indexed item: find items like it (the item itself is left out).")
    k: int = K
    target: Target = TARGET
    filter: PayloadFilter | None = FILTER


class Item(BaseModel):
    """An indexed photo or text, with the URLs that serve its image."""

    id: str
    modality: Literal["image", "text"]
    name: str | None = Field(None, description="The photo's file name (its folder is not disclosed).")
    captions: list[str]
    text: str | None = Field(None, description="A text item's text.")
    metadata: dict[str, Any] = Field(description="Payload keys from the manifest (split, categories, ...).")
    image_url: str | None = Field(None, description="The original image file; None for a text item.")
    thumbnail_url: str | None = Field(None, description=f"A JPEG at most {THUMBNAIL_SIZE} px a side; None for a text item.")


class Hit(Item):
    score: float = Field(description="Cosine similarity; a rank-fusion score for target=both.")


class SearchResult(BaseModel):
    hits: list[Hit]
    seconds: float = Field(description="Time the server spent on the search.")


class Added(BaseModel):
    status: Literal["added", "updated", "already_present"]
    item: Item


class Deleted(BaseModel):
    deleted: str = Field(description="Id of the item removed.")


class Info(BaseModel):
    encoder_spec: str
    dim: int
    distance: str
    count: int
    max_k: int
    max_upload_bytes: int
    max_pixels: int
    writes_need_key: bool = Field(description="Whether adding and deleting need an X-API-Key header.")


class Error(BaseModel):
    """Every error response: one message that says what was wrong."""

    error: str
