"""The one preprocessing path: texts -> token ids, PIL images -> pixel arrays, for every front end.

Training's Ray Data pipeline, the Predictor, batch embedding and Serve all call :class:`Preprocessor`, so a model
sees exactly the same inputs when it is trained, evaluated and served (no train/serve skew). Outputs are numpy
arrays because Ray Data batches are numpy; the object pickles (tokenizer and image processor included) because it
is shipped to Ray Data workers.

Where the files live: a Hugging Face directory or hub id holds its tokenizer and/or image processor at the root; a
saved composed vembed model keeps them beside each backbone, in ``text_encoder/`` and ``image_encoder/``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

logger = logging.getLogger(__name__)

#: sub-directories of a saved composed model (see ``vembed.model.families.ComposedFamily``)
TEXT_ENCODER_DIR = "text_encoder"
IMAGE_ENCODER_DIR = "image_encoder"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "image_processor_config.json")


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _has_image_processor_files(directory: Path) -> bool:
    if any((directory / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
        return True
    processor_config = directory / "processor_config.json"
    return processor_config.is_file() and '"image_processor"' in processor_config.read_text()


def _hub_repo_lacks(repo_id: str, names: Sequence[str]) -> bool:
    """True only when the hub repo is known (from the hub, or the cache's record of it) to have none of ``names``:
    a load that failed for any other reason (offline and not cached, no network, a broken file) must surface."""
    from vembed.model.hf import model_file

    try:
        return all(model_file(repo_id, name) is None for name in names)
    except OSError:
        return False


def load_tokenizer(source: str | Path, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer at ``source`` (local directory or hub id), or None when it ships none."""
    directory = Path(source)
    if directory.is_dir():
        if not _has_tokenizer_files(directory):
            return None
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        if _hub_repo_lacks(str(source), _TOKENIZER_FILES):
            return None
        raise


def load_image_processor(source: str | Path, trust_remote_code: bool = False) -> Any | None:
    """The image processor at ``source`` (local directory or hub id), or None when it ships none."""
    directory = Path(source)
    if directory.is_dir():
        if not _has_image_processor_files(directory):
            return None
        return AutoImageProcessor.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    try:
        return AutoImageProcessor.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        if _hub_repo_lacks(str(source), _IMAGE_PROCESSOR_FILES):
            return None
        raise


def _max_positions(source: str | Path, trust_remote_code: bool) -> int | None:
    """The text tower's position-table size from the model config at ``source`` (None when unknown)."""
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "max_position_embeddings", None)


class Preprocessor:
    """Tokeniser + image processor of one model, with vembed's text length and image size settings.

    Args:
        tokenizer: a Hugging Face tokenizer, or None for image-only models.
        image_processor: a Hugging Face image processor, or None for text-only models.
        max_text_length: texts are truncated to this many tokens (capped at the model's position table).
        image_size: square side in pixels to resize (and crop) images to; None keeps the processor's own size.
    """

    def __init__(
        self,
        tokenizer: Any | None = None,
        image_processor: Any | None = None,
        max_text_length: int = 77,
        image_size: int | None = None,
    ):
        if tokenizer is None and image_processor is None:
            raise ValueError("a Preprocessor needs a tokenizer, an image processor, or both")
        if max_text_length < 1:
            raise ValueError(f"max_text_length must be >= 1, got {max_text_length}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None, got {image_size}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_length = max_text_length
        self.image_size = image_size

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_sources(
        cls,
        text_source: str | Path | None,
        image_source: str | Path | None,
        max_text_length: int = 77,
        image_size: int | None = None,
        trust_remote_code: bool = False,
    ) -> Preprocessor:
        """Tokenizer from ``text_source`` and image processor from ``image_source`` (either may be None)."""
        tokenizer = load_tokenizer(text_source, trust_remote_code) if text_source is not None else None
        image_processor = load_image_processor(image_source, trust_remote_code) if image_source is not None else None
        if tokenizer is None and image_processor is None:
            raise FileNotFoundError(
                f"no tokenizer or image processor found at {text_source!r} / {image_source!r}; a model directory "
                "needs tokenizer files and/or preprocessor_config.json (save them with the processor's save_pretrained)"
            )
        if tokenizer is not None:
            limit = _max_positions(text_source, trust_remote_code)
            if limit is not None and limit < max_text_length:
                logger.info("max_text_length %d capped to the model's %d positions", max_text_length, limit)
                max_text_length = limit
        return cls(tokenizer, image_processor, max_text_length=max_text_length, image_size=image_size)

    @classmethod
    def from_pretrained(
        cls,
        model_dir_or_id: str | Path,
        max_text_length: int = 77,
        image_size: int | None = None,
        trust_remote_code: bool = False,
    ) -> Preprocessor:
        """The preprocessing of a model directory or hub id (a saved composed model reads its two sub-directories).

        Raises:
            FileNotFoundError: the path does not exist or holds neither a tokenizer nor an image processor.
        """
        root = Path(model_dir_or_id)
        text_source: str | Path = model_dir_or_id
        image_source: str | Path = model_dir_or_id
        if root.is_dir():
            if (root / TEXT_ENCODER_DIR).is_dir() and (root / IMAGE_ENCODER_DIR).is_dir():
                text_source, image_source = root / TEXT_ENCODER_DIR, root / IMAGE_ENCODER_DIR
        elif str(model_dir_or_id).startswith(("/", ".", "~")):
            raise FileNotFoundError(f"model path not found: {model_dir_or_id}")
        return cls.from_sources(text_source, image_source, max_text_length, image_size, trust_remote_code)

    @classmethod
    def from_config(cls, config: Any) -> Preprocessor:
        """Preprocessing for a vembed config: ``model_name``, or ``text_model_name`` + ``image_model_name``."""
        from vembed.config import as_config

        cfg = as_config(config)
        kwargs = dict(max_text_length=cfg.max_text_length, image_size=cfg.image_size)
        if cfg.model_name is not None:
            return cls.from_pretrained(cfg.model_name, trust_remote_code=cfg.trust_remote_code, **kwargs)
        if cfg.text_model_name is None and cfg.image_model_name is None:
            raise ValueError("set model_name (or text_model_name and image_model_name) to build a Preprocessor")
        return cls.from_sources(
            cfg.text_model_name, cfg.image_model_name, trust_remote_code=cfg.trust_remote_code, **kwargs
        )

    # -- properties -------------------------------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        """True when this preprocessor can tokenise text."""
        return self.tokenizer is not None

    @property
    def has_image(self) -> bool:
        """True when this preprocessor can process images."""
        return self.image_processor is not None

    # -- processing -------------------------------------------------------------------------------------------------
    def process_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenise ``texts``: ``input_ids`` and ``attention_mask``, int64 ``[N, L]``, padded to the batch's longest
        text and truncated to ``max_text_length`` tokens.

        Raises:
            ValueError: no tokenizer, an empty batch, or an empty / whitespace-only text (its index is named).
            TypeError: an entry that is not a string.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (image-only); it cannot encode text")
        if isinstance(texts, str):
            raise TypeError("process_texts takes a list of strings; wrap a single text in a list")
        if len(texts) == 0:
            raise ValueError("process_texts got an empty list of texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text #{i} is a {type(text).__name__}, expected str")
            if not text.strip():
                raise ValueError(f"text #{i} is empty; every query/document text must contain characters")
        encoded = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_text_length,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="np",
        )
        return {
            "input_ids": np.asarray(encoded["input_ids"], dtype=np.int64),
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int64),
        }

    def _size_kwargs(self) -> Mapping[str, Any]:
        if self.image_size is None:
            return {}
        side = self.image_size
        size = getattr(self.image_processor, "size", None) or {}
        uses_shortest_edge = getattr(size, "shortest_edge", None) or (
            isinstance(size, dict) and "shortest_edge" in size
        )
        kwargs: dict[str, Any] = {
            "size": {"shortest_edge": side} if uses_shortest_edge else {"height": side, "width": side}
        }
        if getattr(self.image_processor, "crop_size", None) is not None:
            kwargs["crop_size"] = {"height": side, "width": side}
        return kwargs

    def process_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Resize, crop and normalise decoded images: float32 ``[N, 3, H, W]``.

        Images are decoded by :func:`vembed.data.images.load_image` (paths, URIs, bytes) before they come here.

        Raises:
            ValueError: no image processor, or an empty batch.
            TypeError: an entry that is not a PIL image.
        """
        if self.image_processor is None:
            raise ValueError("this model has no image processor (text-only); it cannot encode images")
        if isinstance(images, Image.Image):
            raise TypeError("process_images takes a list of PIL images; wrap a single image in a list")
        if len(images) == 0:
            raise ValueError("process_images got an empty list of images")
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(
                    f"image #{i} is a {type(image).__name__}, expected a PIL image "
                    "(decode paths and bytes with vembed.data.images.load_image first)"
                )
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        pixels = self.image_processor(rgb, return_tensors="np", **self._size_kwargs())["pixel_values"]
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def save_pretrained(self, text_dir: str | Path, image_dir: str | Path | None = None) -> None:
        """Write the tokenizer to ``text_dir`` and the image processor to ``image_dir`` (default: ``text_dir``)."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(text_dir))
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(image_dir if image_dir is not None else text_dir))

    def __repr__(self) -> str:
        return (
            f"Preprocessor(tokenizer={type(self.tokenizer).__name__ if self.tokenizer else None}, "
            f"image_processor={type(self.image_processor).__name__ if self.image_processor else None}, "
            f"max_text_length={self.max_text_length}, image_size={self.image_size})"
        )
