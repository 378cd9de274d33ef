"""One replica's embedding service: the Predictor behind two ``@serve.batch`` queues (texts, images).

Every request is split into its items and each item enters its modality's queue, so ``max_batch_size`` counts
items, a large request spreads over several forward passes and small concurrent requests share one. A batch
runs the Predictor's own ``encode_text`` / ``encode_image`` (grouped by requested ``dimensions``) in a worker
thread, so the event loop keeps accepting, decoding and queueing the next batch meanwhile. Vectors are therefore
the Predictor's vectors: the same ones batch embedding writes.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from typing import Any, Optional, TypeVar

import numpy as np
from PIL import Image
from ray import serve

from vembed.inference import Embedded, VEmbedFactoryPredictor
from vembed.serving.errors import APIError
from vembed.serving.limits import item_param
from vembed.serving.metrics import BatchMetrics
from vembed.serving.schemas import BatchStats
from vembed.serving.settings import ServeArgs

T = TypeVar("T")


async def within_timeout(work: Awaitable[T], timeout_s: float) -> T:
    """Await ``work``; past ``timeout_s`` cancel it (queued batch items are dropped) and answer 504."""
    try:
        return await asyncio.wait_for(work, timeout=timeout_s)
    except asyncio.TimeoutError:
        raise APIError(504, f"request took longer than {timeout_s} s (request_timeout_s)", code="timeout") from None


class EmbeddingService:
    """Predictor + batch queues + the checks that need the model (dimensions, token window)."""

    def __init__(self, args: ServeArgs) -> None:
        self.args = args
        self.predictor = VEmbedFactoryPredictor(args.model, device=args.device, dtype=args.dtype)
        self.model_name = args.served_model_name
        self.created = int(time.time())
        self.batch_stats = {"text": BatchStats(), "image": BatchStats()}
        self.batch_metrics = BatchMetrics()  # the same counters as Ray Serve metrics
        for batch_fn in (self._text_batch, self._image_batch):
            batch_fn.set_max_batch_size(args.max_batch_size)
            batch_fn.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    # ---- model facts ----
    @property
    def embedding_dim(self) -> int:
        return self.predictor.embedding_dim

    @property
    def model_info(self) -> dict[str, Any]:
        return self.predictor.model_info

    def output_dim(self, dimensions: Optional[int]) -> int:
        """Width of the vectors a request with ``dimensions`` gets."""
        return dimensions or self.embedding_dim

    def check_dimensions(self, dimensions: Optional[int]) -> Optional[int]:
        """``dimensions`` must fit the model (1..full size); 400 naming the valid range otherwise."""
        if dimensions is None:
            return None
        full = self.predictor.model_info["full_dim"]
        if not 1 <= dimensions <= full:
            raise APIError(
                400, f"dimensions={dimensions} must be between 1 and {full}", param="dimensions", code="invalid_value"
            )
        return dimensions

    def check_modalities(self, texts: bool, images: bool, param: str) -> None:
        """400 when a request sends a modality this model has no tokenizer / image processor for."""
        pre = self.predictor.preprocessor
        if texts and not pre.has_text:
            raise APIError(
                400, f"{param}: model {self.model_name!r} embeds images only", param=param, code="unsupported_input"
            )
        if images and not pre.has_image:
            raise APIError(
                400, f"{param}: model {self.model_name!r} embeds texts only", param=param, code="unsupported_input"
            )

    def resolve_instruction(self, instruction: Optional[str], instruction_name: Optional[str]) -> Optional[str]:
        """The instruction of a request: its ``instruction`` text or the preset named ``instruction_name`` (400 for
        both, an unknown preset, or any instruction to a model that takes none); None: the model's default."""
        if instruction is not None and instruction_name is not None:
            raise APIError(
                400, "send instruction or instruction_name, not both", param="instruction_name", code="invalid_value"
            )
        if instruction_name is not None:
            presets = self.args.instructions
            if instruction_name not in presets:
                known = ", ".join(sorted(presets)) or "none are configured"
                raise APIError(
                    400,
                    f"instruction_name={instruction_name!r} is not a preset of this server (presets: {known})",
                    param="instruction_name",
                    code="invalid_value",
                )
            instruction = presets[instruction_name]
        try:
            self.predictor.preprocessor.check_instruction(instruction)
        except (ValueError, TypeError) as exc:
            param = "instruction_name" if instruction_name is not None else "instruction"
            raise APIError(400, f"{param}: {exc}", param=param, code="unsupported_input") from exc
        return instruction

    def count_tokens(self, texts: Sequence[str], param: str, offsets: Optional[Sequence[int]] = None) -> int:
        """Tokens the model will read (after truncation); with ``text_overflow="reject"`` a longer text is a 413."""
        self.check_modalities(texts=bool(texts), images=False, param=param)
        pre = self.predictor.preprocessor
        window = pre.max_text_length
        lengths = [len(ids) for ids in pre.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]
        if self.args.text_overflow == "reject":
            for i, length in enumerate(lengths):
                if length > window:
                    where = item_param(param, i, offsets)
                    raise APIError(
                        413,
                        f"{where} has {length} tokens; the model reads at most {window} (text_overflow=reject)",
                        param=where,
                        code="text_too_long",
                    )
        return int(sum(min(length, window) for length in lengths))

    # ---- encoding (batched) ----
    async def embed_texts(
        self, texts: Sequence[str], dimensions: Optional[int] = None, instruction: Optional[str] = None
    ) -> Embedded:
        """``(N, D)`` float32 for ``texts``, each text batched with other requests' texts (same instruction;
        multi-vector models: one ``[L_i, D]`` array per text)."""
        rows = await within_timeout(
            asyncio.gather(*(self._text_batch((t, dimensions, instruction)) for t in texts)),
            self.args.request_timeout_s,
        )
        return list(rows) if self.predictor.multi_vector else np.stack(rows)

    async def embed_images(
        self, images: Sequence[Image.Image], dimensions: Optional[int] = None, instruction: Optional[str] = None
    ) -> Embedded:
        """``(N, D)`` float32 for decoded ``images``, each image batched with other requests' images (multi-vector
        models: one ``[L_i, D]`` array per image)."""
        rows = await within_timeout(
            asyncio.gather(*(self._image_batch((im, dimensions, instruction)) for im in images)),
            self.args.request_timeout_s,
        )
        return list(rows) if self.predictor.multi_vector else np.stack(rows)

    async def probe(self) -> int:
        """Encode one tiny input of a modality the model has, through its batch queue; returns the vector width."""
        if self.predictor.preprocessor.has_text:
            return int((await self.embed_texts(["ready"]))[0].shape[-1])
        return int((await self.embed_images([Image.new("RGB", (8, 8))]))[0].shape[-1])

    async def similarity(self, **kwargs: Any) -> np.ndarray:
        """The Predictor's own ``similarity`` (not batched across requests), in a worker thread.

        Composed text+image queries go through the model's own fusion (``encode_multimodal``), as in Python.
        """
        try:
            return await within_timeout(
                asyncio.to_thread(self.predictor.similarity, **kwargs), self.args.request_timeout_s
            )
        except ValueError as exc:  # the Predictor's input errors, e.g. a text+image query on a non-composed model
            raise APIError(400, str(exc), code="invalid_value") from exc

    # The decorator's sizes are placeholders: __init__ sets max_batch_size and the wait from ServeArgs.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _text_batch(self, items: list[tuple[str, Optional[int], Optional[str]]]) -> list[np.ndarray]:
        self.batch_metrics.record("text", len(items))
        return await self._run_grouped(items, self.predictor.encode_text, self.batch_stats["text"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _image_batch(self, items: list[tuple[Image.Image, Optional[int], Optional[str]]]) -> list[np.ndarray]:
        self.batch_metrics.record("image", len(items))
        return await self._run_grouped(items, self.predictor.encode_image, self.batch_stats["image"])

    @staticmethod
    async def _run_grouped(
        items: list[tuple[Any, Optional[int], Optional[str]]], encode: Any, stats: BatchStats
    ) -> list[np.ndarray]:
        """One Predictor call per distinct ``(dimensions, instruction)`` in the batch; rows back in arrival order."""
        stats.batches += 1
        stats.items += len(items)
        groups: dict[tuple[Optional[int], Optional[str]], list[int]] = defaultdict(list)
        for i, (_, dim, instruction) in enumerate(items):
            groups[(dim, instruction)].append(i)
        out: list[Optional[np.ndarray]] = [None] * len(items)
        for (dim, instruction), idx in groups.items():
            inputs = [items[i][0] for i in idx]
            kwargs = {"instruction": instruction} if instruction is not None else {}
            vectors = await asyncio.to_thread(encode, inputs, batch_size=len(inputs), dimension=dim, **kwargs)
            for row, i in zip(vectors, idx, strict=True):
                out[i] = row
        return out  # type: ignore[return-value]
