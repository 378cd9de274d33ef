"""The HTTP API (FastAPI): OpenAI-compatible ``/v1/embeddings`` plus ``/embed/*``, ``/similarity``, health.

Routes only translate: they check a request against the limits, decode its images, hand items to the
:class:`EmbeddingService` and shape the answer. ``/health`` and ``/ready`` are open (for Kubernetes probes);
everything else needs the API key when one is configured.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from vembed.inference import Embedded
from vembed.serving import schemas
from vembed.serving.errors import APIError, install_error_handlers, validation_error
from vembed.serving.limits import BodySizeLimit, check_item_count, check_model, check_texts
from vembed.serving.schemas import (
    EmbeddingObject,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedImageRequest,
    EmbedResponse,
    EmbedTextRequest,
    ErrorResponse,
    HealthResponse,
    ImageItem,
    ModelCard,
    ModelList,
    ReadyResponse,
    SimilarityRequest,
    SimilarityResponse,
    Usage,
)
from vembed.serving.security import check_api_key, load_api_key
from vembed.serving.service import EmbeddingService
from vembed.serving.sources import load_request_image, read_image_source

ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "invalid request (malformed JSON, wrong types, empty input, bad image)",
        401: "missing or wrong API key",
        403: "server-side file or URL not allowed",
        404: "unknown model",
        503: "overloaded: every replica holds max_ongoing_requests and max_queued_requests wait",
        413: "too many items, text or image too large, body too large",
        504: "request timed out",
    }.items()
}

# /embed/image takes JSON or a multipart upload; FastAPI cannot infer both, so the schema is written out here.
EMBED_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": EmbedImageRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "dimensions": {"type": "integer", "minimum": 1},
                        "model": {"type": "string"},
                        "instruction": {"type": "string"},
                        "instruction_name": {"type": "string"},
                    },
                }
            },
        },
    }
}


def create_api(service: EmbeddingService, replica_id: str = "local") -> FastAPI:
    """The FastAPI app of one replica, bound to its ``service`` (routes are closures over it)."""
    args = service.args
    api_key = load_api_key(args)
    bearer = HTTPBearer(auto_error=False, description="the server's API key (only when one is configured)")

    async def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        check_api_key(credentials.credentials if credentials else None, api_key)

    app = FastAPI(
        title="vembed",
        summary="Text and image embeddings (OpenAI-compatible /v1/embeddings) served by Ray Serve",
        description=schemas.__doc__,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=args.max_request_bytes)
    api = APIRouter(dependencies=[Depends(authorize)], responses=ERROR_RESPONSES)

    async def decode_images(sources: Sequence[Union[str, bytes]], params: Sequence[str]) -> list[Image.Image]:
        """Read (inline, allowed file or URL) and decode images in a worker thread, within the image limits."""
        if sources:
            service.check_modalities(texts=False, images=True, param=params[0])

        def work() -> list[Image.Image]:
            out = []
            for source, param in zip(sources, params, strict=True):
                data = source if isinstance(source, bytes) else read_image_source(source, args, param)
                out.append(load_request_image(data, args, param))
            return out

        return await run_in_threadpool(work)

    async def embed_texts(
        texts: list[str], dimensions: Optional[int], param: str, instruction: Optional[str]
    ) -> Embedded:
        check_item_count(len(texts), args, param)
        check_texts(texts, args, param)
        service.count_tokens(texts, param)
        return await service.embed_texts(texts, dimensions, instruction)

    @api.post("/v1/embeddings", response_model=EmbeddingsResponse, tags=["OpenAI"])
    async def create_embeddings(body: EmbeddingsRequest) -> EmbeddingsResponse:
        """Embed texts and images (``{"type": "image", "image": "<data URL or base64>"}``) in one list."""
        check_model(body.model, service.model_name)
        if service.predictor.multi_vector:
            raise APIError(
                400,
                f"model {service.model_name!r} is multi-vector (late interaction): each item is a list of vectors, "
                "which the OpenAI embeddings shape (one vector per item) cannot hold; use POST /embed/text or "
                "/embed/image for per-item vector lists and POST /similarity for MaxSim scores",
                param="model",
                code="multi_vector_model",
            )
        dimensions = service.check_dimensions(body.dimensions)
        instruction = service.resolve_instruction(body.instruction, body.instruction_name)
        items = [body.input] if isinstance(body.input, str) else body.input
        check_item_count(len(items), args, "input")
        text_idx = [i for i, item in enumerate(items) if isinstance(item, str)]
        image_idx = [i for i, item in enumerate(items) if isinstance(item, ImageItem)]
        texts = [items[i] for i in text_idx]
        check_texts(texts, args, "input", offsets=text_idx)
        tokens = service.count_tokens(texts, "input", offsets=text_idx) if texts else 0
        images = await decode_images([items[i].image for i in image_idx], [f"input[{i}].image" for i in image_idx])
        vectors = np.empty((len(items), service.output_dim(dimensions)), dtype=np.float32)
        text_vecs, image_vecs = await asyncio.gather(
            service.embed_texts(texts, dimensions, instruction) if texts else _nothing(),
            service.embed_images(images, dimensions, instruction) if images else _nothing(),
        )
        if texts:
            vectors[text_idx] = text_vecs
        if images:
            vectors[image_idx] = image_vecs
        data = [
            EmbeddingObject(index=i, embedding=_encode_vector(vec, body.encoding_format))
            for i, vec in enumerate(vectors)
        ]
        return EmbeddingsResponse(
            data=data, model=service.model_name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
        )

    @api.post("/embed/text", response_model=EmbedResponse, tags=["embed"])
    async def embed_text(body: EmbedTextRequest) -> EmbedResponse:
        """Embed one text or a list of texts."""
        check_model(body.model, service.model_name)
        dimensions = service.check_dimensions(body.dimensions)
        instruction = service.resolve_instruction(body.instruction, body.instruction_name)
        texts = [body.texts] if isinstance(body.texts, str) else body.texts
        return _embed_response(service.model_name, await embed_texts(texts, dimensions, "texts", instruction))

    @api.post("/embed/image", response_model=EmbedResponse, tags=["embed"], openapi_extra=EMBED_IMAGE_BODY)
    async def embed_image(request: Request) -> EmbedResponse:
        """Embed images sent as JSON (``images``: data URLs or base64) or as a multipart upload (``files``)."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            async with request.form(max_files=args.max_items + 1, max_fields=16) as form:
                files = [f for f in form.getlist("files") if not isinstance(f, str)]
                model, dimensions = form.get("model"), _form_int(form.get("dimensions"), "dimensions")
                check_model(model if isinstance(model, str) else None, service.model_name)
                instruction = service.resolve_instruction(
                    _form_str(form.get("instruction"), "instruction"),
                    _form_str(form.get("instruction_name"), "instruction_name"),
                )
                check_item_count(len(files), args, "files")
                sources = [await f.read(args.max_image_bytes + 1) for f in files]
            params = [f"files[{i}]" for i in range(len(sources))]
        elif content_type.startswith("application/json") or not content_type:
            try:
                body = EmbedImageRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                raise validation_error(exc.errors()) from None
            check_model(body.model, service.model_name)
            dimensions = body.dimensions
            instruction = service.resolve_instruction(body.instruction, body.instruction_name)
            sources = [body.images] if isinstance(body.images, str) else body.images
            check_item_count(len(sources), args, "images")
            params = [f"images[{i}]" for i in range(len(sources))]
        else:
            raise APIError(
                415, f"content type {content_type!r}: send application/json or multipart/form-data", code="invalid_body"
            )
        dimensions = service.check_dimensions(dimensions)
        vectors = await service.embed_images(await decode_images(sources, params), dimensions, instruction)
        return _embed_response(service.model_name, vectors)

    @api.post("/similarity", response_model=SimilarityResponse, tags=["embed"])
    async def similarity(body: SimilarityRequest) -> SimilarityResponse:
        """Cosine similarity of a query (text, image, or both for composed models) to each document (MaxSim for
        multi-vector models)."""
        check_model(body.model, service.model_name)
        dimensions = service.check_dimensions(body.dimensions)
        instruction = service.resolve_instruction(body.instruction, body.instruction_name)
        if body.query_text is None and body.query_image is None:
            raise APIError(400, "send query_text, query_image or both", param="query_text", code="empty_input")
        docs = body.documents
        check_item_count(len(docs), args, "documents")
        kinds = {isinstance(d, ImageItem) for d in docs}
        if len(kinds) > 1:
            raise APIError(400, "documents must be all texts or all images", param="documents", code="invalid_value")
        if body.query_text is not None:
            check_texts([body.query_text], args, "query_text")
            service.count_tokens([body.query_text], "query_text")
        query_image = None
        if body.query_image is not None:
            query_image = (await decode_images([body.query_image], ["query_image"]))[0]
        if kinds == {True}:
            documents: list = await decode_images(
                [d.image for d in docs], [f"documents[{i}].image" for i in range(len(docs))]
            )
            document_type = "image"
        else:
            check_texts(docs, args, "documents")
            service.count_tokens(docs, "documents")
            documents, document_type = list(docs), "text"
        scores = await service.similarity(
            query_text=body.query_text,
            query_image=query_image,
            documents=documents,
            document_type=document_type,
            dimension=dimensions,
            instruction=instruction,
        )
        return SimilarityResponse(model=service.model_name, scores=[float(s) for s in scores])

    def model_card() -> ModelCard:
        return ModelCard(id=service.model_name, created=service.created, info=service.model_info)

    @api.get("/v1/models", response_model=ModelList, tags=["OpenAI"])
    async def list_models() -> ModelList:
        """The served model (one per application)."""
        return ModelList(data=[model_card()])

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["OpenAI"])
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id, service.model_name)
        return model_card()

    @app.get("/health", response_model=HealthResponse, tags=["probes"])
    async def health() -> HealthResponse:
        """Liveness: the replica's event loop answers; with its batch counters (how full batches run)."""
        return HealthResponse(replica=replica_id, batches=service.batch_stats)

    @app.get("/ready", response_model=ReadyResponse, tags=["probes"], responses={503: {"model": ErrorResponse}})
    async def ready() -> ReadyResponse:
        """Readiness: a probe input goes through the batch queue and the model."""
        try:
            width = await service.probe()
        except APIError:
            raise
        except Exception as exc:  # the model cannot encode: not ready, but the replica stays up
            raise APIError(503, f"model is not ready: {exc}", code="not_ready") from exc
        return ReadyResponse(model=service.model_name, embedding_dim=width)

    app.include_router(api)
    return app


def _embed_response(model: str, vectors: Embedded) -> EmbedResponse:
    """``/embed/*`` answer: a vector per item, or (multi-vector) a list of vectors per item plus ``num_vectors``."""
    if isinstance(vectors, list):
        return EmbedResponse(
            model=model,
            dimensions=int(vectors[0].shape[1]),
            embeddings=[v.tolist() for v in vectors],
            num_vectors=[len(v) for v in vectors],
        )
    return EmbedResponse(model=model, dimensions=vectors.shape[1], embeddings=vectors.tolist())


async def _nothing() -> None:
    return None


def _encode_vector(vector: np.ndarray, encoding_format: str) -> Union[list[float], str]:
    """``float`` -> list of floats; ``base64`` -> little-endian float32 bytes, base64 (what OpenAI clients decode)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _form_str(value: object, param: str) -> Optional[str]:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    raise APIError(400, f"{param} must be a text field, got a file", param=param, code="invalid_value")


def _form_int(value: object, param: str) -> Optional[int]:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise APIError(400, f"{param} must be a positive integer, got {value!r}", param=param, code="invalid_value")
