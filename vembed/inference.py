"""Inference: :class:`VEmbedFactoryPredictor` turns texts and images into embeddings.

The Predictor is the one inference path: batch embedding (Ray Data actors) and Serve replicas call the same
``encode_*`` methods, so a vector is the same whichever front end produced it. It loads a vembed checkpoint (or a
raw HF model directory / hub id), picks CUDA when present, runs in eval + inference mode and returns float32 numpy.

Multi-vector (late interaction, ``pooling_method: none``) checkpoints return one ``[L_i, D]`` array per item instead
of one row: the item's token vectors (which tokens count is the checkpoint's ``vector_tokens``: every non-padding
token for ColBERT-style encoders, a VLM's text and image tokens for ColQwen-style ones), each row L2-normalised,
padding never included, so an item's vectors are the same alone or in any batch. ``similarity`` then scores by
MaxSim (:mod:`vembed.maxsim`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from vembed.data.images import IMAGE_EXTENSIONS, load_image
from vembed.data.processing import Preprocessor
from vembed.maxsim import maxsim_arrays
from vembed.model import EmbeddingModel, finalize_embeddings

ImageInput = Union[str, os.PathLike, bytes, Image.Image]
#: what the encoders return: ``[N, D]`` (single-vector) or one ``[L_i, D]`` array per item (multi-vector)
Embedded = Union[np.ndarray, list[np.ndarray]]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POOLING_METHODS = ("cls", "mean", "last")


def _check_model_path(model_path: str | os.PathLike) -> str:
    """A local-looking path must exist; anything else is treated as a hub id (offline: must be cached)."""
    text = str(model_path)
    if not text:
        raise ValueError("model_path is empty; pass a checkpoint directory or a hub id")
    looks_local = Path(text).exists() or text.startswith((".", "/", "~")) or os.sep in text.strip("/").split("/", 1)[-1]
    if looks_local and not Path(text).expanduser().exists():
        raise FileNotFoundError(f"model_path {text!r} does not exist; pass a vembed checkpoint or HF model directory")
    return str(Path(text).expanduser()) if Path(text).expanduser().exists() else text


class VEmbedFactoryPredictor:
    """Encode texts and images with a trained (or any supported HF) embedding model.

    Args:
        model_path: a vembed checkpoint (``output/checkpoint-epoch-3``), an HF model directory or a hub id.
        device: ``"cuda:0"``, ``"cpu"`` ...; ``None`` picks CUDA when available.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` compute dtype (outputs are always float32).
        pooling_method: override the checkpoint's pooling (``"cls"``, ``"mean"``, ``"last"``); ``None`` keeps it.
        dimension: default Matryoshka dimension for every call (truncate + re-normalise); ``None`` = full size.
        max_text_length: tokens per input (``None``: the checkpoint's saved length, else the model's default: 77 for
            encoders, its own limit for decoders, VLMs and SigLIP).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str | None = None,
        dtype: str = "float32",
        pooling_method: str | None = None,
        dimension: int | None = None,
        max_text_length: int | None = None,
        mrl_dim: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
        if pooling_method is not None and pooling_method not in POOLING_METHODS:
            raise ValueError(
                f"pooling_method={pooling_method!r} is not supported; use one of {POOLING_METHODS} or None"
            )
        if dimension is not None and mrl_dim is not None and dimension != mrl_dim:
            raise ValueError(f"dimension={dimension} and mrl_dim={mrl_dim} disagree; pass one of them")
        self.model_path = _check_model_path(model_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[dtype]
        overrides = {"pooling_method": pooling_method} if pooling_method else {}
        self.model = EmbeddingModel.from_pretrained(self.model_path, **overrides)
        self.model.to(device=self.device, dtype=self.dtype).eval()
        self.preprocessor = Preprocessor.from_pretrained(self.model_path, max_text_length=max_text_length)
        self.dimension = self._check_dimension(dimension if dimension is not None else mrl_dim)

    @classmethod
    def from_model(
        cls, model: EmbeddingModel, preprocessor: Preprocessor, dimension: int | None = None
    ) -> VEmbedFactoryPredictor:
        """Wrap an in-memory model (e.g. during training's validation) without loading anything from disk.

        The model keeps its device and dtype; callers switch it to eval mode (and back) themselves.
        """
        predictor = cls.__new__(cls)
        predictor.model_path = "<in-memory>"
        predictor.model = model
        param = next(model.parameters())
        predictor.device, predictor.dtype = param.device, param.dtype
        predictor.preprocessor = preprocessor
        predictor.dimension = predictor._check_dimension(dimension)
        return predictor

    # ---- properties ----
    @property
    def multi_vector(self) -> bool:
        """True when every item is a set of vectors ``[L_i, D]`` (late interaction), not one vector."""
        return self.model.multi_vector

    @property
    def embedding_dim(self) -> int:
        """Size of the vectors returned by default (the Matryoshka ``dimension`` when one is set)."""
        return self.dimension or self.model.embedding_dim

    @property
    def model_info(self) -> dict[str, Any]:
        """What produced these vectors: written beside batch outputs, shown by Serve's ``/v1/models``."""
        meta = Path(self.model_path) / "vembed.json"
        return {
            "model_path": self.model_path,
            "family": self.model.family,
            "pooling_method": self.model.pooling_method,
            "embedding_dim": self.embedding_dim,
            "full_dim": self.model.embedding_dim,
            "normalize": self.model.normalize,
            "mrl_dims": list(self.model.mrl_dims),
            "multi_vector": self.model.multi_vector,
            "vector_tokens": self.model.vector_tokens,
            "vembed_json_sha256": hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else None,
        }

    # ---- public encoders ----
    def encode_text(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        dimension: int | None = None,
        max_vectors: int | None = None,
        instruction: str | None = None,
    ) -> Embedded:
        """Texts -> ``(D,)`` for one string, ``(N, D)`` for a list. Batches are sorted by length for speed.

        Multi-vector models: one ``[L_i, D]`` array per text (a list for a list), pruned to at most ``max_vectors``
        vectors when given (:func:`prune_vectors`).

        ``instruction``: for models that take one (a VLM's system message; Qwen3-Embedding's
        ``Instruct: {instruction}\nQuery:{text}`` queries); None is the model's default (a VLM's "Represent the
        user's input.", raw text otherwise). A ValueError for a model that takes no instruction.
        """
        single = isinstance(texts, str)
        items = [texts] if single else list(self._check_list(texts, "texts"))
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
            if not text.strip():
                raise ValueError(f"texts[{i}] is empty; every text needs at least one non-space character")
        self._check_batch_size(batch_size)
        self._check_max_vectors(max_vectors)
        self.preprocessor.check_instruction(instruction)
        order = sorted(range(len(items)), key=lambda i: len(items[i]), reverse=True)
        out = self._output(len(items), dimension)
        for start in range(0, len(items), batch_size):
            idx = order[start : start + batch_size]
            tokens = self.preprocessor.process_texts([items[i] for i in idx], instruction)
            if self.preprocessor.is_vlm:
                encoded = self.encode_sequences(tokens, dimension, max_vectors)
            else:
                encoded = self.encode_tokens(tokens["input_ids"], tokens["attention_mask"], dimension, max_vectors)
            _place(out, idx, encoded)
        return out[0] if single else out

    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        batch_size: int = 32,
        dimension: int | None = None,
        max_vectors: int | None = None,
        instruction: str | None = None,
    ) -> Embedded:
        """Images (paths, PIL images or encoded bytes) -> ``(D,)`` for one image, ``(N, D)`` for a list.

        Multi-vector models: one ``[L_i, D]`` array per image (its patch vectors), at most ``max_vectors`` each.
        ``instruction``: a VLM's system message (None: its default); a ValueError for models without one.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(self._check_list(images, "images"))
        self._check_batch_size(batch_size)
        self._check_max_vectors(max_vectors)
        self.preprocessor.check_instruction(instruction)
        out = self._output(len(items), dimension)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pil = [self._load(img, f"images[{start + j}]") for j, img in enumerate(chunk)]
            if self.preprocessor.is_vlm:
                batch = self.preprocessor.process_conversations(None, pil, instruction)
                encoded = self.encode_sequences(batch, dimension, max_vectors)
            else:
                pixels = self.preprocessor.process_images(pil)
                encoded = self.encode_pixel_values(pixels, dimension, max_vectors)
            _place(out, range(start, start + len(chunk)), encoded)
        return out[0] if single else out

    def encode_multimodal(
        self,
        texts: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput],
        dimension: int | None = None,
        max_vectors: int | None = None,
        instruction: str | None = None,
    ) -> Embedded:
        """Composed queries (image + text, e.g. "the same shape in blue"), fused by the model's ``encode``; a VLM
        embeds each pair as one sequence (the image, then the text), with ``instruction`` as its system message.

        Multi-vector models: the text's and the image's vectors together, one ``[L_i, D]`` array per query.
        """
        self._check_max_vectors(max_vectors)
        single = isinstance(texts, str)
        text_list = [texts] if single else list(self._check_list(texts, "texts"))
        image_list = [images] if single else list(self._check_list(images, "images"))
        if len(text_list) != len(image_list):
            raise ValueError(f"encode_multimodal got {len(text_list)} texts but {len(image_list)} images")
        self.preprocessor.check_instruction(instruction)
        if self.preprocessor.is_vlm:
            pil = [self._load(x, f"images[{i}]") for i, x in enumerate(image_list)]
            batch = self.preprocessor.process_conversations(text_list, pil, instruction)
            out = self.encode_sequences(batch, dimension, max_vectors)
            return out[0] if single else out
        tokens = self.preprocessor.process_texts(text_list, instruction)
        pixels = self.preprocessor.process_images([self._load(x, f"images[{i}]") for i, x in enumerate(image_list)])
        with torch.inference_mode():
            emb = self.model.encode(
                input_ids=torch.as_tensor(tokens["input_ids"], device=self.device),
                attention_mask=torch.as_tensor(tokens["attention_mask"], device=self.device),
                pixel_values=torch.as_tensor(pixels, device=self.device, dtype=self.dtype),
            )
        out = self._finish(emb, dimension, max_vectors)
        return out[0] if single else out

    def similarity(
        self,
        query_text: str | None = None,
        documents: Sequence[Any] = (),
        query_image: ImageInput | None = None,
        document_type: str = "auto",
        dimension: int | None = None,
        instruction: str | None = None,
    ) -> np.ndarray:
        """Cosine similarity of one query (text, image, or both) to each document -> ``(N,)``.

        Multi-vector models score by MaxSim (:func:`vembed.maxsim.maxsim_arrays`): for each query vector its best
        cosine with a document vector, summed over the query's vectors.

        ``document_type="auto"`` treats PIL images, bytes and existing files with an image extension as images and
        everything else as text; pass ``"text"`` or ``"image"`` to say it explicitly. ``instruction`` applies to the
        query; documents get the model's default (a VLM's default system message, raw text otherwise).
        """
        if query_text is None and query_image is None:
            raise ValueError("similarity needs query_text, query_image or both")
        docs = list(self._check_list(documents, "documents"))
        if document_type not in ("auto", "text", "image"):
            raise ValueError(f"document_type={document_type!r}; use 'auto', 'text' or 'image'")
        if query_text is not None and query_image is not None:
            query = self.encode_multimodal(query_text, query_image, dimension, instruction=instruction)
        elif query_text is not None:
            query = self.encode_text(query_text, dimension=dimension, instruction=instruction)
        else:
            query = self.encode_image(query_image, dimension=dimension, instruction=instruction)
        is_image = [document_type == "image" or (document_type == "auto" and self._looks_like_image(d)) for d in docs]
        if self.multi_vector:
            doc_vectors: list[Any] = [None] * len(docs)
            for flag, encode in ((True, self.encode_image), (False, self.encode_text)):
                idx = [i for i, f in enumerate(is_image) if f == flag]
                if idx:
                    _place(doc_vectors, idx, encode([docs[i] for i in idx], dimension=dimension))
            return maxsim_arrays(query, doc_vectors)
        doc_emb = np.empty((len(docs), query.shape[-1]), dtype=np.float32)
        image_idx = [i for i, flag in enumerate(is_image) if flag]
        text_idx = [i for i, flag in enumerate(is_image) if not flag]
        if image_idx:
            doc_emb[image_idx] = self.encode_image([docs[i] for i in image_idx], dimension=dimension)
        if text_idx:
            doc_emb[text_idx] = self.encode_text([docs[i] for i in text_idx], dimension=dimension)
        return _cosine(doc_emb, query)

    # ---- lower-level encoders shared with batch embedding and Serve ----
    def encode_tokens(
        self, input_ids: Any, attention_mask: Any, dimension: int | None = None, max_vectors: int | None = None
    ) -> Embedded:
        """Already-tokenised texts ``[N, L]`` -> ``[N, D]`` float32 (multi-vector: one ``[L_i, D]`` per text)."""
        with torch.inference_mode():
            emb = self.model.encode_text(
                torch.as_tensor(np.asarray(input_ids), device=self.device),
                torch.as_tensor(np.asarray(attention_mask), device=self.device),
            )
        return self._finish(emb, dimension, max_vectors)

    def encode_sequences(
        self, batch: Mapping[str, Any], dimension: int | None = None, max_vectors: int | None = None
    ) -> Embedded:
        """A vision-language batch (``preprocessor.process_conversations``: ``input_ids``, ``attention_mask``,
        ``mm_token_type_ids`` and optional ``pixel_values`` / ``image_grid_thw``) -> ``[N, D]`` float32."""
        tensors = {}
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "content_mask", "image_grid_thw"):
            if batch.get(key) is not None:
                tensors[key] = torch.as_tensor(np.asarray(batch[key]), device=self.device)
        if batch.get("pixel_values") is not None:
            tensors["pixel_values"] = torch.as_tensor(
                np.asarray(batch["pixel_values"]), device=self.device, dtype=self.dtype
            )
        with torch.inference_mode():
            emb = self.model.encode(**tensors)
        return self._finish(emb, dimension, max_vectors)

    def encode_pixel_values(
        self, pixel_values: Any, dimension: int | None = None, max_vectors: int | None = None
    ) -> Embedded:
        """Preprocessed images ``[N, 3, H, W]`` (from ``preprocessor.process_images``) -> ``[N, D]`` float32
        (multi-vector: one ``[L_i, D]`` per image)."""
        with torch.inference_mode():
            pixels = torch.as_tensor(np.asarray(pixel_values), device=self.device, dtype=self.dtype)
            emb = self.model.encode_image(pixels)
        return self._finish(emb, dimension, max_vectors)

    # ---- helpers ----
    def _finish(
        self,
        emb: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        dimension: int | None,
        max_vectors: int | None = None,
    ) -> Embedded:
        """Matryoshka truncation + re-normalisation (the model's one implementation), then float32 numpy.

        Multi-vector output ``(tokens [N, L, D], mask [N, L])`` becomes one ``[L_i, D]`` array per item holding only
        the tokens the mask keeps (then pruned to ``max_vectors``).
        """
        dim = self._check_dimension(dimension) or self.dimension
        mask = None
        if isinstance(emb, tuple):
            emb, mask = emb
        elif max_vectors is not None:
            raise ValueError("max_vectors applies to multi-vector models only; this model returns one vector per item")
        if dim is not None and dim < emb.shape[-1]:
            emb = finalize_embeddings(emb.float(), dim=dim, normalize=True)
        out = emb.float().cpu().numpy()
        if mask is None:
            return out
        keep = mask.bool().cpu().numpy()
        return [prune_vectors(np.ascontiguousarray(row[k]), max_vectors) for row, k in zip(out, keep, strict=True)]

    def _output(self, n: int, dimension: int | None) -> Any:
        """Where encoded items are placed: an ``[n, D]`` array, or a list of n slots for multi-vector items."""
        if self.multi_vector:
            self._check_dimension(dimension)
            return [None] * n
        return np.empty((n, self._out_dim(dimension)), dtype=np.float32)

    def _check_max_vectors(self, max_vectors: int | None) -> None:
        if max_vectors is None:
            return
        if isinstance(max_vectors, bool) or not isinstance(max_vectors, int) or max_vectors < 1:
            raise ValueError(f"max_vectors={max_vectors!r} must be a positive integer (or None to keep every vector)")
        if not self.multi_vector:
            raise ValueError("max_vectors applies to multi-vector models only; this model returns one vector per item")

    def _out_dim(self, dimension: int | None) -> int:
        return self._check_dimension(dimension) or self.embedding_dim

    def _check_dimension(self, dimension: int | None) -> int | None:
        if dimension is None:
            return None
        full = self.model.embedding_dim
        if not isinstance(dimension, int) or isinstance(dimension, bool) or not 0 < dimension <= full:
            raise ValueError(f"dimension={dimension!r} must be an integer in 1..{full} (the model's embedding size)")
        return dimension

    @staticmethod
    def _check_list(items: Any, name: str) -> Sequence[Any]:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise ValueError(f"{name} must be a list, got {type(items).__name__}")
        if len(items) == 0:
            raise ValueError(f"{name} is empty; pass at least one item")
        return items

    @staticmethod
    def _check_batch_size(batch_size: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")

    @staticmethod
    def _load(image: ImageInput, name: str) -> Image.Image:
        try:
            return load_image(image)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{name}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: {exc}") from exc

    @staticmethod
    def _looks_like_image(doc: Any) -> bool:
        if isinstance(doc, (Image.Image, bytes, bytearray)):
            return True
        return isinstance(doc, (str, os.PathLike)) and str(doc).lower().endswith(IMAGE_EXTENSIONS)


def _place(out: Any, idx: Sequence[int], values: Embedded) -> None:
    """``out[idx] = values`` for an ``[N, D]`` array or, multi-vector, a list of per-item arrays."""
    if isinstance(out, np.ndarray):
        out[list(idx)] = values
        return
    for i, value in zip(idx, values, strict=True):
        out[i] = value


def prune_vectors(vectors: np.ndarray, max_vectors: int | None) -> np.ndarray:
    """At most ``max_vectors`` of an item's vectors ``[L, D]``, chosen to keep MaxSim close to the full set.

    Greedy farthest-point selection: start from the first vector, then repeatedly add the vector least similar to
    any already kept one. A query vector's best match is then rarely lost, since every dropped vector has a kept
    one close to it. Kept vectors stay in their original order; ``None`` or ``max_vectors >= L`` keeps all.
    """
    if max_vectors is None or len(vectors) <= max_vectors:
        return vectors
    kept = [0]
    closest = vectors @ vectors[0]  # each vector's best similarity to the kept set
    for _ in range(max_vectors - 1):
        closest[kept] = np.inf
        pick = int(np.argmin(closest))
        kept.append(pick)
        closest = np.maximum(closest, vectors @ vectors[pick])
    return np.ascontiguousarray(vectors[sorted(kept)])


def _cosine(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)
    return (matrix @ vector / np.maximum(norms, 1e-12)).astype(np.float32)
