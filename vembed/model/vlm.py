"""The ``vlm`` family: one vision-language decoder (Qwen3-VL) that embeds text, images and both as one sequence.

Unlike the two-tower families, a VLM never encodes an image on its own: every item (a text, an image, or images
followed by a text) is one chat-template sequence in which each image is a run of ``<|image_pad|>`` tokens that the
model fills with its vision tower's features. The batch format (built by preprocessing, see the VLM contract):

* ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` int64 ``[B, L]`` (``mm_token_type_ids`` is 1 on image
  tokens, 0 elsewhere; left or right padding), and ``content_mask`` ``[B, L]`` (1 on each item's text and image
  tokens: the vectors of a multi-vector model with ``vector_tokens: content``, ColQwen-style),
* ``pixel_values`` float ``[sum_i P_i, C]``: the flat patches of every image of the batch in item order, and
  ``image_grid_thw`` int64 ``[N_images, 3]`` (both absent when no item has an image).

One forward of ``AutoModel`` (``Qwen3VLModel``, no LM head) gives the last hidden state; ``auto`` pooling is the
state of the last non-padding token (:func:`vembed.model.pooling.pool` ``"last"``, either padding side), which under
causal attention is the only token that has seen the whole item. Positions (multimodal RoPE) are computed from the
attention mask for every batch, text-only included, so an item gets the same vector alone or padded in a batch.

The family is chosen from the checkpoint's config -- a ``vision_config`` and an ``image_token_id`` -- never from the
model id (:func:`is_vlm_config`). Width and length limit come from ``text_config``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vembed.data.processing import is_vlm_config
from vembed.model.families import EncoderFamily, _resolve
from vembed.model.hf import unwrap
from vembed.model.pooling import pool

#: LoRA's default targets in a VLM: the language model's attention and MLP projections (full-name regexes, so the
#: vision tower's own ``proj`` layers stay out unless ``lora_vision_tower`` adds them)
TEXT_LORA_PATTERN = r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_LORA_PATTERN = r"(.*\.)?visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))"

#: the batch keys of one role, beside ``input_ids`` / ``attention_mask``
SEQUENCE_KEYS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "content_mask",
    "pixel_values",
    "image_grid_thw",
)


def text_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config (``text_config``), or ``config`` itself for a plain text model."""
    return getattr(config, "text_config", None) or config


def image_token_counts(image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Image tokens per image, ``t * h * w / merge_size**2`` (what preprocessing expands each image to)."""
    return image_grid_thw.long().prod(dim=-1) // (merge_size**2)


def check_sequence_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mm_token_type_ids: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    merge_size: int,
    prefix: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check one VLM batch (shapes, patches vs grid, image tokens vs grid); returns ids, mask, mm types as int64.

    ``mm_token_type_ids`` defaults to 1 where ``input_ids`` is the image token. Every problem raises a ValueError
    naming the key (with ``prefix``, e.g. ``"query_"``) and what is wrong.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{prefix}input_ids must be a [batch, tokens] tensor, got {shape}")
    input_ids = input_ids.long()
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    image_tokens = input_ids == image_token_id
    mm = image_tokens.long() if mm_token_type_ids is None else mm_token_type_ids.long()
    for key, value in (("attention_mask", attention_mask), ("mm_token_type_ids", mm)):
        if tuple(value.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{prefix}{key} shape {tuple(value.shape)} differs from {prefix}input_ids {tuple(input_ids.shape)}"
            )
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError(
            f"{prefix}pixel_values and {prefix}image_grid_thw go together (flat patches + one [t, h, w] row per "
            "image); got only one of them"
        )
    num_tokens = int((image_tokens & attention_mask.bool()).sum())
    if pixel_values is None:
        if num_tokens:
            raise ValueError(
                f"{prefix}input_ids hold {num_tokens} image tokens but the batch has no {prefix}pixel_values"
            )
        return input_ids, attention_mask, mm
    if pixel_values.dim() != 2:
        raise ValueError(
            f"{prefix}pixel_values must be flat patches [sum of t*h*w over images, channels] for a VLM, got "
            f"{tuple(pixel_values.shape)}; build VLM inputs with the model's preprocessing (process_conversations)"
        )
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(f"{prefix}image_grid_thw must be [num_images, 3], got {tuple(image_grid_thw.shape)}")
    patches = int(image_grid_thw.long().prod(dim=-1).sum())
    if patches != pixel_values.shape[0]:
        raise ValueError(
            f"{prefix}pixel_values has {pixel_values.shape[0]} patches but {prefix}image_grid_thw describes {patches}"
        )
    expected = int(image_token_counts(image_grid_thw, merge_size).sum())
    if num_tokens != expected:
        raise ValueError(
            f"{prefix}input_ids hold {num_tokens} image tokens but {prefix}image_grid_thw needs {expected} "
            f"(t*h*w/{merge_size**2} per image); was an image's token run truncated?"
        )
    if not bool((mm.bool() == image_tokens)[attention_mask.bool()].all()):
        raise ValueError(f"{prefix}mm_token_type_ids must be 1 exactly on the image tokens and 0 elsewhere")
    return input_ids, attention_mask, mm


class VLMFamily(EncoderFamily):
    """A vision-language decoder (``AutoModel`` = ``Qwen3VLModel``); see the module docstring."""

    name = "vlm"
    modalities = ("text", "image")
    backbone_dirs = {"backbone": ""}
    #: EmbeddingModel routes every input of this family through :meth:`encode_sequence`
    sequence_inputs: ClassVar[bool] = True

    def __init__(
        self, backbones: Mapping[str, PreTrainedModel], pooling: Mapping[str, str], sources: Mapping[str, str]
    ):
        super().__init__(pooling, sources)
        self.backbone = backbones["backbone"]
        model = unwrap(self.backbone)
        if not is_vlm_config(model.config) or not hasattr(model, "get_rope_index"):
            raise ValueError(
                f"{type(model).__name__} is not a vision-language decoder vembed can drive (it needs a "
                "vision_config, an image_token_id and multimodal RoPE, as Qwen3-VL has)"
            )

    @classmethod
    def resolve_pooling(cls, method, modality, backbones, sources):
        return _resolve(method, "last")

    @property
    def _config(self) -> PretrainedConfig:
        return unwrap(self.backbone).config

    def output_dims(self) -> dict[str, int]:
        width = text_config_of(self._config).hidden_size
        return {"text": width, "image": width}

    def head_dims(self) -> dict[str, int]:
        """One head for every item: text, image and mixed items live in one sequence space."""
        return {"sequence": text_config_of(self._config).hidden_size}

    def max_text_tokens(self) -> int | None:
        return getattr(text_config_of(self._config), "max_position_embeddings", None)

    @property
    def merge_size(self) -> int:
        return int(self._config.vision_config.spatial_merge_size)

    @property
    def image_token_id(self) -> int:
        return int(self._config.image_token_id)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.encode_sequence(input_ids, attention_mask)

    def encode_image(self, pixel_values: torch.Tensor):
        raise ValueError(
            "a vlm model encodes images inside a conversation sequence: call EmbeddingModel.encode with "
            "input_ids, attention_mask, mm_token_type_ids, pixel_values [patches, C] and image_grid_thw (the "
            "output of the model's preprocessing), not pixel_values alone"
        )

    def encode_sequence(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ):
        """One forward over a batch of items (already checked by :func:`check_sequence_batch`), pooled."""
        model = unwrap(self.backbone)
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.image_token_id).long()
        grid = image_grid_thw.long() if image_grid_thw is not None else None
        position_ids, _ = model.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=grid, attention_mask=attention_mask
        )
        extra: dict[str, Any] = {}
        if pixel_values is not None:
            extra = {"pixel_values": pixel_values.to(model.visual.dtype), "image_grid_thw": grid}
        states = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            **extra,
        ).last_hidden_state
        method = self.pooling["text"]
        return pool(states, attention_mask, method), (attention_mask if method == "none" else None)

    def default_lora_targets(self, include_vision: bool = False) -> str:
        """LoRA targets as a PEFT regex over full module names: the text decoder's attention and MLP projections
        (``q/k/v/o_proj``, ``gate/up/down_proj`` under ``language_model``), plus with ``include_vision`` the vision
        blocks' ``attn.qkv`` / ``attn.proj`` / ``mlp.linear_fc1/2`` (``lora_vision_tower: true``).

        Raises:
            ValueError: the backbone has none of these layers (another VLM layout): set lora_target_modules.
        """
        pattern = TEXT_LORA_PATTERN + (f"|{VISION_LORA_PATTERN}" if include_vision else "")
        names = [name for name, module in unwrap(self.backbone).named_modules() if isinstance(module, nn.Linear)]
        if not any(re.fullmatch(TEXT_LORA_PATTERN, name) for name in names) or (
            include_vision and not any(re.fullmatch(VISION_LORA_PATTERN, name) for name in names)
        ):
            raise ValueError(
                f"no default LoRA targets match {type(unwrap(self.backbone)).__name__}; set lora_target_modules "
                f"to some of its linear layers: {sorted({n.rsplit('.', 1)[-1] for n in names})}"
            )
        return pattern
