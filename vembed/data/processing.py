"""The one preprocessing path: texts -> token ids, PIL images -> pixel arrays, for every front end.

Training's Ray Data pipeline, the Predictor, batch embedding and Serve all call :class:`Preprocessor`, so a model
sees exactly the same inputs when it is trained, evaluated and served (no train/serve skew). Outputs are numpy
arrays because Ray Data batches are numpy; the object pickles (tokenizer and image processor included) because it
is shipped to Ray Data workers.

Where the files live: a Hugging Face directory or hub id holds its tokenizer and/or image processor at the root; a
saved composed vembed model keeps them beside each backbone, in ``text_encoder/`` and ``image_encoder/``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from vembed.data.vlm_inputs import DEFAULT_VLM_INSTRUCTION, format_instruction, process_conversations

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


def _check_vlm_files(source: str | Path | None, tokenizer: Any | None, image_processor: Any | None) -> None:
    """A vision-language model directory must carry its processor: tokenizer with chat template + image processor."""
    missing = []
    if tokenizer is None:
        missing.append("tokenizer files (tokenizer.json, tokenizer_config.json)")
    elif not getattr(tokenizer, "chat_template", None):
        missing.append("a chat template (chat_template.jinja)")
    if image_processor is None:
        missing.append("an image processor (preprocessor_config.json)")
    if missing:
        raise FileNotFoundError(
            f"{source} is a vision-language model but lacks its processor files: {'; '.join(missing)}. Copy them "
            "from the original checkpoint (or save its processor with save_pretrained into this directory)"
        )


#: text towers whose own pooling reads a fixed position whatever the mask (SigLIP's last position): their texts are
#: padded to ``max_text_length`` (``padding="max_length"``, as they were trained), so a text's vector never depends
#: on the other texts of its batch. Keyed by the text config's ``model_type``.
FIXED_POSITION_TEXT_MODELS = frozenset({"siglip", "siglip2", "siglip_text_model", "siglip2_text_model"})
#: query formats of instruction-tuned decoder text embedders, keyed by ``model_type`` (Qwen3-Embedding's official
#: format; documents stay raw text)
INSTRUCTION_FORMATS: dict[str, str] = {"qwen3": "Instruct: {instruction}\nQuery:{text}"}
#: texts per item when neither the config nor a saved checkpoint says otherwise (bidirectional encoders)
DEFAULT_MAX_TEXT_LENGTH = 77
#: the preprocessing settings a checkpoint records (``vembed.json``'s ``preprocessing``) and every path reads back
SETTINGS_KEYS = (
    "max_text_length",
    "image_size",
    "image_min_pixels",
    "image_max_pixels",
    "text_padding",
    "instruction_format",
    "default_instruction",
    "query_instruction",
    "document_instruction",
)
TEXT_PADDINGS = ("longest", "max_length")
_SPEC_FILE = "vembed.json"  # vembed.model.checkpoint.SPEC_FILE (that module imports this one)


def _load_config(source: str | Path | None, trust_remote_code: bool) -> Any | None:
    """The model config at ``source`` (None when there is none, e.g. a bare tokenizer directory).

    A LoRA adapter checkpoint has no config.json of its own: its base model's config is read.
    """
    if source is None:
        return None
    adapter_config = Path(source) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(source) / "config.json").is_file():
        source = json.loads(adapter_config.read_text()).get("base_model_name_or_path") or source
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def is_vlm_config(config: Any) -> bool:
    """True for a vision-language decoder config (Qwen3-VL): a ``vision_config`` and an ``image_token_id``."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "image_token_id", None) is not None


def _is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def model_preprocessing(config: Any) -> dict[str, Any]:
    """What a model's config decides about its preprocessing, once per model.

    Returns ``text_limit`` (the text tower's position table or None), ``default_max_text_length`` (the model's own
    limit for decoders, VLMs and fixed-position towers, else 77 capped at the limit), ``text_padding``
    (``max_length`` for :data:`FIXED_POSITION_TEXT_MODELS`, else ``longest``), ``instruction_format`` and
    ``default_instruction`` (None when the model takes no instruction) and ``image_token_id`` (VLMs only).
    """
    text_config = (getattr(config, "text_config", None) or config) if config is not None else None
    limit = getattr(text_config, "max_position_embeddings", None) if text_config is not None else None
    vlm = config is not None and is_vlm_config(config)
    model_type = getattr(text_config, "model_type", None)
    fixed = (
        model_type in FIXED_POSITION_TEXT_MODELS or getattr(config, "model_type", None) in FIXED_POSITION_TEXT_MODELS
    )
    causal = config is not None and (_is_causal(config) or vlm)
    if (causal or fixed) and limit is not None:
        default_length = limit
    else:
        default_length = min(DEFAULT_MAX_TEXT_LENGTH, limit) if limit else DEFAULT_MAX_TEXT_LENGTH
    instruction_format = INSTRUCTION_FORMATS.get(model_type) if causal and not vlm else None
    return {
        "text_limit": limit,
        "default_max_text_length": default_length,
        "text_padding": "max_length" if fixed else "longest",
        "instruction_format": instruction_format,
        "default_instruction": DEFAULT_VLM_INSTRUCTION if vlm else None,
        "image_token_id": int(config.image_token_id) if vlm else None,
    }


def saved_preprocessing(directory: str | Path) -> dict[str, Any]:
    """The preprocessing settings recorded in a vembed checkpoint's ``vembed.json`` (empty for other paths)."""
    path = Path(directory) / _SPEC_FILE
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text()).get("preprocessing") or {}
    return {k: v for k, v in saved.items() if k in SETTINGS_KEYS}


def resolve_settings(config: Any, chosen: Mapping[str, Any], has_text: bool = True) -> dict[str, Any]:
    """The full :data:`SETTINGS_KEYS` of a model: ``chosen`` (None = unset) over what its ``config`` decides
    (:func:`model_preprocessing`); ``max_text_length`` is capped at the text tower's position table."""
    derived = model_preprocessing(config)
    out = {key: chosen.get(key) for key in SETTINGS_KEYS}
    for key in ("text_padding", "instruction_format", "default_instruction"):
        if out[key] is None:
            out[key] = derived[key]
    length = out["max_text_length"] or derived["default_max_text_length"]
    limit = derived["text_limit"]
    if has_text and limit is not None and limit < length:
        logger.info("max_text_length %d capped to the model's %d positions", length, limit)
        length = limit
    out["max_text_length"] = length
    return out


class Preprocessor:
    """Tokeniser + image processor of one model, with vembed's text length, image size and instruction settings.

    Args:
        tokenizer: a Hugging Face tokenizer, or None for image-only models.
        image_processor: a Hugging Face image processor, or None for text-only models.
        max_text_length: texts are truncated to this many tokens (capped at the model's position table).
        image_size: square side in pixels to resize (and crop) images to; None keeps the processor's own size.
        text_padding: ``longest`` (pad to the batch's longest text) or ``max_length`` (pad every text to
            ``max_text_length``: models whose pooling reads a fixed position, see :data:`FIXED_POSITION_TEXT_MODELS`).
        image_min_pixels, image_max_pixels: VLM pixel bounds (``size={"shortest_edge": min, "longest_edge": max}``
            of the model's image processor); None keeps the processor's own.
        image_token_id: set for vision-language embedders (Qwen3-VL): inputs become chat conversations
            (:mod:`vembed.data.vlm_inputs`).
        instruction_format: a text decoder's query format (``"Instruct: {instruction}\\nQuery:{text}"``), or None.
        default_instruction: a VLM's system message when none is given ("Represent the user's input.").
        query_instruction, document_instruction: configured instructions for the query and document roles
            (None: the model's default).
    """

    def __init__(
        self,
        tokenizer: Any | None = None,
        image_processor: Any | None = None,
        max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
        image_size: int | None = None,
        *,
        text_padding: str = "longest",
        image_min_pixels: int | None = None,
        image_max_pixels: int | None = None,
        image_token_id: int | None = None,
        instruction_format: str | None = None,
        default_instruction: str | None = None,
        query_instruction: str | None = None,
        document_instruction: str | None = None,
    ):
        if tokenizer is None and image_processor is None:
            raise ValueError("a Preprocessor needs a tokenizer, an image processor, or both")
        if max_text_length < 1:
            raise ValueError(f"max_text_length must be >= 1, got {max_text_length}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None, got {image_size}")
        if text_padding not in TEXT_PADDINGS:
            raise ValueError(f"text_padding must be one of {TEXT_PADDINGS}, got {text_padding!r}")
        for name, value in (("image_min_pixels", image_min_pixels), ("image_max_pixels", image_max_pixels)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if image_min_pixels and image_max_pixels and image_min_pixels > image_max_pixels:
            raise ValueError(f"image_min_pixels={image_min_pixels} is above image_max_pixels={image_max_pixels}")
        if instruction_format is not None and not {"{instruction}", "{text}"} <= set(
            re.findall(r"\{\w+\}", instruction_format)
        ):
            raise ValueError(f"instruction_format {instruction_format!r} needs both {{instruction}} and {{text}}")
        if image_token_id is not None and tokenizer is None:
            raise ValueError("a vision-language Preprocessor needs the model's tokenizer (with its chat template)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_length = max_text_length
        self.image_size = image_size
        self.text_padding = text_padding
        self.image_min_pixels = image_min_pixels
        self.image_max_pixels = image_max_pixels
        self.image_token_id = image_token_id
        self.instruction_format = instruction_format
        self.default_instruction = default_instruction or (
            DEFAULT_VLM_INSTRUCTION if image_token_id is not None else None
        )
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_sources(
        cls,
        text_source: str | Path | None,
        image_source: str | Path | None,
        max_text_length: int | None = None,
        image_size: int | None = None,
        trust_remote_code: bool = False,
        **settings: Any,
    ) -> Preprocessor:
        """Tokenizer from ``text_source`` and image processor from ``image_source`` (either may be None).

        ``max_text_length=None`` takes the model's default (see :func:`model_preprocessing`); ``settings`` are the
        other keys of :data:`SETTINGS_KEYS` (None: the model's own).

        Raises:
            FileNotFoundError: neither a tokenizer nor an image processor; a VLM without its tokenizer or image
                processor files.
        """
        unknown = set(settings) - set(SETTINGS_KEYS)
        if unknown:
            raise TypeError(f"unknown preprocessing settings {sorted(unknown)}; known: {', '.join(SETTINGS_KEYS)}")
        tokenizer = load_tokenizer(text_source, trust_remote_code) if text_source is not None else None
        image_processor = load_image_processor(image_source, trust_remote_code) if image_source is not None else None
        if tokenizer is None and image_processor is None:
            raise FileNotFoundError(
                f"no tokenizer or image processor found at {text_source!r} / {image_source!r}; a model directory "
                "needs tokenizer files and/or preprocessor_config.json (save them with the processor's save_pretrained)"
            )
        config = _load_config(text_source if tokenizer is not None else image_source, trust_remote_code)
        derived = model_preprocessing(config)
        if derived["image_token_id"] is not None:
            _check_vlm_files(text_source, tokenizer, image_processor)
        chosen = resolve_settings(
            config,
            {"max_text_length": max_text_length, "image_size": image_size, **settings},
            has_text=tokenizer is not None,
        )
        return cls(tokenizer, image_processor, image_token_id=derived["image_token_id"], **chosen)

    @classmethod
    def from_pretrained(
        cls,
        model_dir_or_id: str | Path,
        max_text_length: int | None = None,
        image_size: int | None = None,
        trust_remote_code: bool = False,
        **settings: Any,
    ) -> Preprocessor:
        """The preprocessing of a model directory or hub id (a saved composed model reads its two sub-directories).

        A vembed checkpoint's saved settings (``vembed.json``) apply; an explicit (non-None) argument overrides them.

        Raises:
            FileNotFoundError: the path does not exist or holds neither a tokenizer nor an image processor.
        """
        root = Path(model_dir_or_id)
        text_source: str | Path = model_dir_or_id
        image_source: str | Path = model_dir_or_id
        saved: dict[str, Any] = {}
        if root.is_dir():
            if (root / TEXT_ENCODER_DIR).is_dir() and (root / IMAGE_ENCODER_DIR).is_dir():
                text_source, image_source = root / TEXT_ENCODER_DIR, root / IMAGE_ENCODER_DIR
            saved = saved_preprocessing(root)
        elif str(model_dir_or_id).startswith(("/", ".", "~")):
            raise FileNotFoundError(f"model path not found: {model_dir_or_id}")
        explicit = {"max_text_length": max_text_length, "image_size": image_size, **settings}
        merged = {**saved, **{k: v for k, v in explicit.items() if v is not None}}
        return cls.from_sources(text_source, image_source, trust_remote_code=trust_remote_code, **merged)

    @classmethod
    def from_config(cls, config: Any) -> Preprocessor:
        """Preprocessing for a vembed config: ``model_name``, or ``text_model_name`` + ``image_model_name``;
        ``max_text_length``, ``image_size``, ``image_min_pixels``, ``image_max_pixels``, ``query_instruction`` and
        ``document_instruction`` (null: a checkpoint's saved value, else the model's own)."""
        from vembed.config import as_config

        cfg = as_config(config)
        kwargs = dict(
            max_text_length=cfg.max_text_length,
            image_size=cfg.image_size,
            image_min_pixels=cfg.image_min_pixels,
            image_max_pixels=cfg.image_max_pixels,
            query_instruction=cfg.query_instruction,
            document_instruction=cfg.document_instruction,
        )
        if cfg.model_name is not None:
            return cls.from_pretrained(cfg.model_name, trust_remote_code=cfg.trust_remote_code, **kwargs)
        if cfg.text_model_name is None and cfg.image_model_name is None:
            raise ValueError("set model_name (or text_model_name and image_model_name) to build a Preprocessor")
        return cls.from_sources(
            cfg.text_model_name, cfg.image_model_name, trust_remote_code=cfg.trust_remote_code, **kwargs
        )

    def settings(self) -> dict[str, Any]:
        """The preprocessing settings a checkpoint records, :data:`SETTINGS_KEYS` -> value."""
        return {key: getattr(self, key) for key in SETTINGS_KEYS}

    # -- properties -------------------------------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        """True when this preprocessor can tokenise text."""
        return self.tokenizer is not None

    @property
    def has_image(self) -> bool:
        """True when this preprocessor can process images."""
        return self.image_processor is not None

    @property
    def is_vlm(self) -> bool:
        """True for a vision-language embedder: every input is a chat conversation (:meth:`process_conversations`)."""
        return self.image_token_id is not None

    @property
    def has_instructions(self) -> bool:
        """True when the model takes an instruction (a VLM's system message, a decoder's query format)."""
        return self.is_vlm or self.instruction_format is not None

    def instruction_for(self, role: str) -> str | None:
        """The configured instruction of a batch role (``query``; ``positive``/``negative``/``document``), or None."""
        return self.query_instruction if role == "query" else self.document_instruction

    def check_instruction(self, instruction: str | None) -> None:
        """Raise a ValueError when an instruction is given to a model that takes none."""
        if instruction is not None and not self.has_instructions:
            raise ValueError(
                f"this model takes no instruction (got instruction={instruction!r}): only vision-language embedders "
                "(Qwen3-VL) and instruction-tuned text decoders (Qwen3-Embedding) have one; drop the instruction"
            )
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")

    # -- processing -------------------------------------------------------------------------------------------------
    def process_texts(self, texts: Sequence[str], instruction: str | None = None) -> dict[str, np.ndarray]:
        """Tokenise ``texts``: ``input_ids`` and ``attention_mask``, int64 ``[N, L]``, truncated to
        ``max_text_length`` tokens and padded per ``text_padding`` (the batch's longest text, or ``max_text_length``).

        ``instruction`` formats each text as an instructed query (``instruction_format``); a VLM renders each text as
        a conversation (:meth:`process_conversations`, which adds ``mm_token_type_ids``). None: the model's default
        (raw text; a VLM's default system message).

        Raises:
            ValueError: no tokenizer, an empty batch, an empty / whitespace-only text (its index is named), or an
                instruction for a model that takes none.
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
        self.check_instruction(instruction)
        if self.is_vlm:
            return self.process_conversations(texts, None, instruction)
        if instruction is not None:
            texts = [self.instruction_format.format(instruction=instruction, text=text) for text in texts]
        encoded = self.tokenizer(
            list(texts),
            padding=self.text_padding,
            truncation=True,
            max_length=self.max_text_length,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="np",
        )
        mask = np.asarray(encoded["attention_mask"], dtype=np.int64)
        if self.text_padding == "max_length" and "attention_mask" not in getattr(
            self.tokenizer, "model_input_names", ("attention_mask",)
        ):
            # a fixed-length model whose tokenizer gives no mask (SigLIP's) was trained attending to its padding
            mask = np.ones_like(mask)
        return {"input_ids": np.asarray(encoded["input_ids"], dtype=np.int64), "attention_mask": mask}

    def process_conversations(
        self,
        texts: Sequence[str | None] | None,
        images: Sequence[Any] | None,
        instruction: str | None = None,
    ) -> dict[str, np.ndarray]:
        """A vision-language embedder's batch (see :mod:`vembed.data.vlm_inputs`): item ``i`` is ``texts[i]``
        (or None) with ``images[i]`` (a PIL image, a list of them, or None); either list may be None.

        ``instruction`` is the system message of every item (None: the model's default, "Represent the user's
        input."; a final "." is added when it ends without punctuation). Returns ``input_ids``,
        ``attention_mask``, ``mm_token_type_ids``, ``content_mask`` ``[B, L]`` and, with images, ``pixel_values`` ``[sum P_i, C]``
        and ``image_grid_thw`` ``[N_images, 3]``.

        Raises:
            ValueError: not a vision-language model, an empty batch, or image tokens over ``max_text_length``.
        """
        if not self.is_vlm:
            raise ValueError(
                "process_conversations is for vision-language embedders (a config with vision_config and "
                "image_token_id); use process_texts / process_images for this model"
            )
        self.check_instruction(instruction)
        bounds = {}
        if self.image_min_pixels is not None:
            bounds["shortest_edge"] = self.image_min_pixels
        if self.image_max_pixels is not None:
            bounds["longest_edge"] = self.image_max_pixels
        if len(bounds) == 1:  # one bound set: the other stays the processor's own
            own = getattr(self.image_processor, "size", None) or {}
            for key in ("shortest_edge", "longest_edge"):
                value = own.get(key) if isinstance(own, dict) else getattr(own, key, None)
                if key not in bounds and value is not None:
                    bounds[key] = value
        return process_conversations(
            self.tokenizer,
            self.image_processor,
            texts,
            images,
            format_instruction(instruction, self.default_instruction or DEFAULT_VLM_INSTRUCTION),
            max_length=self.max_text_length,
            image_token_id=self.image_token_id,
            image_size=bounds or None,
        )

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
        if self.is_vlm:
            raise ValueError("a vision-language model's images are processed with process_conversations")
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
            f"max_text_length={self.max_text_length}, image_size={self.image_size}, text_padding={self.text_padding}, "
            f"vlm={self.is_vlm})"
        )
