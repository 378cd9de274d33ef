"""Request and response bodies of the HTTP API (pydantic), so the OpenAPI schema at ``/docs`` is exact.

``/v1/embeddings`` follows the OpenAI embeddings API. Images go in the ``input`` list as
``{"type": "image", "image": "<data URL or base64>"}``; every other endpoint uses the same image item string.
An image string is one of:

* ``data:image/png;base64,...`` (a data URL) or bare base64 of the encoded file (JPEG, PNG, WebP, ...);
* ``file://<path>``: only when the server sets ``allowed_image_root``; the path must lie inside it;
* ``http(s)://...``: only when the URL starts with one of the server's ``allowed_url_prefixes``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

IMAGE_STRING_HELP = "data URL or base64 of the encoded image (file:// and http(s):// only where the server allows)"


class _Request(BaseModel):
    # Unknown fields are errors: a misspelt "dimension" must not be silently ignored.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


INSTRUCTION_HELP = (
    "instruction for models that take one (a VLM's system message, Qwen3-Embedding's query task); default: the "
    "model's own"
)
INSTRUCTION_NAME_HELP = "name of an instruction preset of the server (`instructions` in its serve config)"


class _Instructed(_Request):
    instruction: Optional[str] = Field(None, min_length=1, description=INSTRUCTION_HELP)
    instruction_name: Optional[str] = Field(None, min_length=1, description=INSTRUCTION_NAME_HELP)


def _reject_token_ids(value: Any) -> Any:
    """OpenAI also accepts token-id arrays; their ids belong to OpenAI's tokenizer, not ours, so refuse them."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(x, int) or (isinstance(x, list) and x and isinstance(x[0], int)) for x in items):
        raise ValueError("token-id arrays are not supported; send the text as strings")
    return value


class ImageItem(_Request):
    """One image inside an ``input``/``documents`` list."""

    type: Literal["image"] = Field(description="always 'image'")
    image: str = Field(description=IMAGE_STRING_HELP)


InputItem = Union[str, ImageItem]


class EmbeddingsRequest(_Instructed):
    """``POST /v1/embeddings`` (OpenAI-compatible)."""

    input: Union[str, list[InputItem]] = Field(description="a text, or a list of texts and image items")
    model: str = Field(description="the served model name (see GET /v1/models)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'base64': little-endian float32 bytes, base64-encoded"
    )
    dimensions: Optional[PositiveInt] = Field(None, description="Matryoshka truncation, re-normalised")
    user: Optional[str] = Field(None, description="accepted for OpenAI compatibility; ignored")

    _no_token_ids = field_validator("input", mode="before")(_reject_token_ids)


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str] = Field(description="floats, or a base64 string for encoding_format=base64")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="text tokens after truncation (images count 0)")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class EmbedTextRequest(_Instructed):
    """``POST /embed/text``."""

    texts: Union[str, list[str]] = Field(description="one text or a list of texts")
    dimensions: Optional[PositiveInt] = Field(None, description="Matryoshka truncation, re-normalised")
    model: Optional[str] = Field(None, description="optional; must name the served model when given")


class EmbedImageRequest(_Instructed):
    """``POST /embed/image`` as JSON (multipart upload: ``files`` parts plus optional ``dimensions``/``model``)."""

    images: Union[str, list[str]] = Field(description=f"one image or a list; each a {IMAGE_STRING_HELP}")
    dimensions: Optional[PositiveInt] = Field(None, description="Matryoshka truncation, re-normalised")
    model: Optional[str] = Field(None, description="optional; must name the served model when given")


class EmbedResponse(BaseModel):
    model: str
    dimensions: int
    embeddings: Union[list[list[float]], list[list[list[float]]]] = Field(
        description="one vector per item; multi-vector (late-interaction) models: one list of vectors per item"
    )
    num_vectors: Optional[list[int]] = Field(None, description="multi-vector models: how many vectors each item has")


class SimilarityRequest(_Instructed):
    """``POST /similarity``: one query (text, image, or both for composed models) against documents."""

    query_text: Optional[str] = None
    query_image: Optional[str] = Field(None, description=IMAGE_STRING_HELP)
    documents: list[InputItem] = Field(description="all texts, or all image items")
    dimensions: Optional[PositiveInt] = None
    model: Optional[str] = None


class SimilarityResponse(BaseModel):
    model: str
    scores: list[float] = Field(
        description="cosine similarity of the query to each document, in order (multi-vector models: MaxSim)"
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vembed"
    info: dict[str, Any] = Field(default_factory=dict, description="family, dims, pooling, checkpoint hash")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class BatchStats(BaseModel):
    """Counters of one batch queue of a replica: ``items / batches`` is how well batches fill."""

    batches: int = Field(0, description="forward passes run by this queue")
    items: int = Field(0, description="items they encoded")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    replica: str = Field(description="id of the replica that answered")
    batches: dict[str, BatchStats] = Field(description="per queue ('text', 'image') since the replica started")


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    embedding_dim: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
