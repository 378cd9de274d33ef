"""Encoder families: the backbone(s) behind an :class:`~vembed.model.EmbeddingModel`, one class per family.

Every family answers the same small interface (:class:`EncoderFamily`): which modalities it encodes, the width of
what it returns per modality, ``encode_text`` / ``encode_image`` returning pooled embeddings (or token embeddings
for ``pooling="none"``), and which backbone modules it holds (for LoRA, gradient checkpointing, FSDP and saving).

* ``dual``     -- one HF model with ``get_text_features`` and ``get_image_features`` (CLIP, SigLIP, ...).
  ``pooling="auto"`` is the model's own path (``get_*_features``: CLIP's EOS / class token, SigLIP's last token /
  attention-pooling head, then the model's projection). An explicit pooling method pools the tower's last hidden
  state instead and then applies the model's own projection (and, for CLIP images, the post-LayerNorm that CLIP
  applies before projecting), so ``cls`` on CLIP images and ``last`` on right-padded CLIP text reproduce ``auto``.
* ``composed`` -- any HF text encoder + any HF image encoder, pooled separately (heads map both to one space).
* ``text``     -- one HF text encoder (BERT / BGE / E5 / MiniLM, or a decoder with ``last`` pooling).
* ``image``    -- one HF image encoder (ViT / DINOv2).
* ``vlm``      -- one vision-language decoder (Qwen3-VL): text, image and image+text items are each one sequence
  (:mod:`vembed.model.vlm`).

The family is read from the checkpoint's config (:func:`detect_family`): a config with a ``vision_config`` and an
``image_token_id`` is a vision-language decoder (vlm); otherwise the model class the config maps to either has both ``get_text_features`` and ``get_image_features`` (dual) or takes ``input_ids`` (text) or
``pixel_values`` (image). The model id's spelling is never consulted.

Parameters that vembed's forward never uses are frozen so that DDP does not wait for their gradients: HF's own
``pooler`` (BERT's dense+tanh, ViT's pooler; vembed pools itself), a dual model's ``logit_scale`` / ``logit_bias``
(vembed's losses own temperature and bias), and SigLIP's attention-pooling head when pooling is explicit.
``logit_scale`` is also reshaped from 0-dim to 1 element because FSDP2's ``fully_shard`` refuses 0-dim parameters;
:mod:`vembed.model.checkpoint` restores the original shape on save so plain ``transformers`` still loads the result.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vembed.data.processing import IMAGE_ENCODER_DIR, TEXT_ENCODER_DIR
from vembed.model.hf import load_backbone, load_hf_config, sentence_transformers_pooling, unwrap
from vembed.model.pooling import check_pooling_method, pool

MODALITIES: tuple[str, ...] = ("text", "image")
Encoded = tuple[torch.Tensor, "torch.Tensor | None"]  # (embeddings, token mask for pooling "none" else None)


@dataclass(frozen=True)
class DualLayout:
    """Where a dual model keeps its towers and the per-modality norm/projection applied after explicit pooling."""

    text_tower: str = "text_model"
    image_tower: str = "vision_model"
    text_norm: str | None = None
    text_projection: str | None = None
    image_norm: str | None = None
    image_projection: str | None = None
    unused_when_explicit: dict[str, tuple[str, ...]] = field(default_factory=dict)


# Explicit pooling needs to know where a dual model's projection lives; model types absent here support "auto" only.
DUAL_LAYOUTS: dict[str, DualLayout] = {
    "clip": DualLayout(
        text_projection="text_projection",
        image_norm="vision_model.post_layernorm",
        image_projection="visual_projection",
    ),
    "siglip": DualLayout(text_projection="text_model.head", unused_when_explicit={"image": ("vision_model.head",)}),
}


def _submodule(root: nn.Module, path: str | None) -> nn.Module | None:
    return None if path is None else root.get_submodule(path)


def _out_width(module: nn.Module | None, fallback: int) -> int:
    return module.out_features if isinstance(module, nn.Linear) else fallback


def _freeze(module: nn.Module | None) -> None:
    if module is not None:
        module.requires_grad_(False)


def _freeze_hf_pooler(model: nn.Module) -> None:
    """HF ``pooler`` heads are never used (vembed pools token states itself): freeze them for DDP."""
    _freeze(getattr(model, "pooler", None))


def _is_causal_text_model(config: PretrainedConfig) -> bool:
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def natural_text_pooling(config: PretrainedConfig, source: str) -> str:
    """``auto`` pooling of a text tower: the sentence-transformers config if shipped, else ``last`` for causal
    decoders (the only token that has seen the whole text) and ``mean`` for bidirectional encoders."""
    declared = sentence_transformers_pooling(source)
    if declared is not None:
        return declared
    return "last" if _is_causal_text_model(config) else "mean"


def _resolve(method: str, natural: str | Callable[[], str]) -> str:
    """``method``, or for ``auto`` the tower's natural pooling (a callable is only called then: reading a
    sentence-transformers config may refuse the model, which an explicit method opts out of)."""
    if method != "auto":
        return check_pooling_method(method)
    return natural() if callable(natural) else natural


def _text_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _image_states(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).last_hidden_state


def _pooled(states: torch.Tensor, mask: torch.Tensor | None, method: str) -> Encoded:
    """Pool token states; for ``none`` also return the mask (all ones for image patches)."""
    out = pool(states, mask, method)
    if method != "none":
        return out, None
    if mask is None:
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
    return out, mask


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "text_config", None) or config


class EncoderFamily(nn.Module, abc.ABC):
    """The interface every family implements; :class:`EmbeddingModel` talks to nothing else.

    ``pooling`` maps each modality to its resolved method (``cls``/``mean``/``last``/``none``, or ``auto`` for the
    dual family's own path). ``sources`` maps each backbone attribute to where it was loaded from (used to copy the
    tokenizer / image processor when saving).
    """

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]]
    #: backbone attribute -> sub-directory of a saved vembed model ("" = the directory root)
    backbone_dirs: ClassVar[dict[str, str]]

    def __init__(self, pooling: Mapping[str, str], sources: Mapping[str, str]):
        super().__init__()
        self.pooling = dict(pooling)
        self.sources = dict(sources)

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        sources: Mapping[str, str],
        pooling: str | Mapping[str, str] = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> EncoderFamily:
        """Load the backbone(s) from ``sources`` (backbone attribute -> local dir or hub id).

        ``pooling`` is either one method for every modality (``auto`` resolved per tower) or an already-resolved
        ``{modality: method}`` mapping (as stored in ``vembed.json``).
        """
        missing = set(cls.backbone_dirs) - set(sources)
        if missing:
            raise ValueError(f"the {cls.name} family needs sources for {sorted(missing)}, got {sorted(sources)}")
        backbones = {
            attr: load_backbone(sources[attr], dtype=dtype, trust_remote_code=trust_remote_code)
            for attr in cls.backbone_dirs
        }
        if isinstance(pooling, str):
            resolved = {m: cls.resolve_pooling(pooling, m, backbones, sources) for m in cls.modalities}
        else:
            resolved = {m: check_pooling_method(pooling[m]) if pooling[m] != "auto" else "auto" for m in cls.modalities}
        return cls(backbones, resolved, sources)

    @classmethod
    @abc.abstractmethod
    def resolve_pooling(
        cls, method: str, modality: str, backbones: Mapping[str, nn.Module], sources: Mapping[str, str]
    ) -> str:
        """The concrete pooling for ``modality`` when the configured method is ``method`` (``auto`` resolved)."""

    # -- the interface used by EmbeddingModel -----------------------------------------------------------------
    def backbones(self) -> dict[str, nn.Module]:
        """Backbone attribute -> module (possibly PEFT-wrapped)."""
        return {attr: getattr(self, attr) for attr in self.backbone_dirs}

    def set_backbone(self, attr: str, module: nn.Module) -> None:
        """Replace a backbone (used by LoRA to install the PEFT wrapper)."""
        if attr not in self.backbone_dirs:
            raise KeyError(f"{self.name} family has no backbone {attr!r}; it has {sorted(self.backbone_dirs)}")
        setattr(self, attr, module)

    @abc.abstractmethod
    def output_dims(self) -> dict[str, int]:
        """Width of ``encode_<modality>``'s output, per modality."""

    def head_dims(self) -> dict[str, int]:
        """Input width of each projection head, by head name (one head per modality unless a family says else)."""
        return self.output_dims()

    def max_text_tokens(self) -> int | None:
        """Longest token sequence the text tower accepts (its position table), or None when unbounded/unknown."""
        return None

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        """Pooled text embeddings ``[B, W]`` (or token embeddings ``[B, L, W]`` + mask for pooling ``none``);
        families without a text tower raise a ValueError naming what they do encode."""
        raise ValueError(f"the {self.name} family encodes {'/'.join(self.modalities)} only, not text")

    def encode_image(self, pixel_values: torch.Tensor) -> Encoded:
        """Pooled image embeddings ``[B, W]`` (or patch embeddings + an all-ones mask for pooling ``none``);
        families without an image tower raise a ValueError naming what they do encode."""
        raise ValueError(f"the {self.name} family encodes {'/'.join(self.modalities)} only, not images")

    def modality_modules(self, modality: str) -> list[nn.Module] | None:
        """The submodules that only ``modality`` runs through (its tower, norm and projection), so that a run
        that never encodes it can freeze them; ``[]`` for a modality the family lacks, None when the family cannot
        tell. Default: single-backbone families, whose one backbone serves their one modality."""
        return [self.backbone] if modality in self.modalities else []

    def describe(self) -> dict[str, Any]:
        """Family-specific facts recorded in ``vembed.json`` (nothing by default)."""
        return {}


class _SingleBackboneFamily(EncoderFamily):
    """A family of one HF encoder saved at the directory root (text-only and image-only models)."""

    backbone_dirs = {"backbone": ""}

    def __init__(
        self, backbones: Mapping[str, PreTrainedModel], pooling: Mapping[str, str], sources: Mapping[str, str]
    ):
        super().__init__(pooling, sources)
        self.backbone = backbones["backbone"]
        _freeze_hf_pooler(self.backbone)


class TextFamily(_SingleBackboneFamily):
    """A single HF text encoder, pooled by the configured method."""

    name = "text"
    modalities = ("text",)

    @classmethod
    def resolve_pooling(cls, method, modality, backbones, sources):
        return _resolve(method, lambda: natural_text_pooling(unwrap(backbones["backbone"]).config, sources["backbone"]))

    def output_dims(self) -> dict[str, int]:
        return {"text": unwrap(self.backbone).config.hidden_size}

    def max_text_tokens(self) -> int | None:
        return getattr(unwrap(self.backbone).config, "max_position_embeddings", None)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        states = _text_states(self.backbone, input_ids, attention_mask)
        return _pooled(states, attention_mask, self.pooling["text"])


class ImageFamily(_SingleBackboneFamily):
    """A single HF image encoder (ViT / DINOv2), pooled by the configured method (``auto`` = class token)."""

    name = "image"
    modalities = ("image",)

    @classmethod
    def resolve_pooling(cls, method, modality, backbones, sources):
        return _resolve(method, "cls")

    def output_dims(self) -> dict[str, int]:
        return {"image": unwrap(self.backbone).config.hidden_size}

    def encode_image(self, pixel_values: torch.Tensor) -> Encoded:
        return _pooled(_image_states(self.backbone, pixel_values), None, self.pooling["image"])


class ComposedFamily(EncoderFamily):
    """Any HF text encoder + any HF image encoder, each pooled on its own (text: ``auto`` as for the text family,
    images: ``auto`` = class token). Their widths usually differ, so composed models normally carry heads."""

    name = "composed"
    modalities = ("text", "image")
    backbone_dirs = {"text_encoder": TEXT_ENCODER_DIR, "image_encoder": IMAGE_ENCODER_DIR}

    def __init__(
        self, backbones: Mapping[str, PreTrainedModel], pooling: Mapping[str, str], sources: Mapping[str, str]
    ):
        super().__init__(pooling, sources)
        self.text_encoder = backbones["text_encoder"]
        self.image_encoder = backbones["image_encoder"]
        _freeze_hf_pooler(self.text_encoder)
        _freeze_hf_pooler(self.image_encoder)

    @classmethod
    def resolve_pooling(cls, method, modality, backbones, sources):
        if modality == "image":
            return _resolve(method, "cls")
        text_config = unwrap(backbones["text_encoder"]).config
        return _resolve(method, lambda: natural_text_pooling(text_config, sources["text_encoder"]))

    def output_dims(self) -> dict[str, int]:
        return {
            "text": unwrap(self.text_encoder).config.hidden_size,
            "image": unwrap(self.image_encoder).config.hidden_size,
        }

    def max_text_tokens(self) -> int | None:
        return getattr(unwrap(self.text_encoder).config, "max_position_embeddings", None)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        states = _text_states(self.text_encoder, input_ids, attention_mask)
        return _pooled(states, attention_mask, self.pooling["text"])

    def encode_image(self, pixel_values: torch.Tensor) -> Encoded:
        return _pooled(_image_states(self.image_encoder, pixel_values), None, self.pooling["image"])

    def modality_modules(self, modality: str) -> list[nn.Module] | None:
        return [self.text_encoder if modality == "text" else self.image_encoder]


class DualFamily(EncoderFamily):
    """One HF model with ``get_text_features`` / ``get_image_features`` (CLIP, SigLIP, ...); see the module doc
    for what ``auto`` and explicit pooling mean here."""

    name = "dual"
    modalities = ("text", "image")
    backbone_dirs = {"backbone": ""}
    #: parameters reshaped from 0-dim to 1 element for FSDP2; the original shapes are restored on save
    RESHAPED_PARAMETERS: ClassVar[tuple[str, ...]] = ("logit_scale", "logit_bias")

    def __init__(
        self, backbones: Mapping[str, PreTrainedModel], pooling: Mapping[str, str], sources: Mapping[str, str]
    ):
        super().__init__(pooling, sources)
        self.backbone = backbones["backbone"]
        model = unwrap(self.backbone)
        model_type = model.config.model_type
        self.layout = DUAL_LAYOUTS.get(model_type)
        explicit = [m for m, method in self.pooling.items() if method != "auto"]
        if explicit and self.layout is None:
            raise ValueError(
                f"explicit pooling ({self.pooling}) is not available for dual model type {model_type!r}: vembed "
                f"knows where the projections are only for {sorted(DUAL_LAYOUTS)}. Use pooling_method='auto'."
            )
        #: original shape of every reshaped scalar parameter (restored when saving)
        self.original_shapes: dict[str, list[int]] = {}
        for name in self.RESHAPED_PARAMETERS:
            param = getattr(model, name, None)
            if isinstance(param, nn.Parameter):
                self.original_shapes[name] = list(param.shape)
                setattr(model, name, nn.Parameter(param.detach().reshape(-1).clone(), requires_grad=False))
        for modality in explicit:
            for path in self.layout.unused_when_explicit.get(modality, ()):
                _freeze(model.get_submodule(path))

    @classmethod
    def resolve_pooling(cls, method, modality, backbones, sources):
        return "auto" if method == "auto" else check_pooling_method(method)

    def _parts(self, modality: str) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
        """(tower, norm applied to the pooled vector or None, projection or None) for ``modality``."""
        model, layout = unwrap(self.backbone), self.layout
        if modality == "text":
            tower, norm, projection = layout.text_tower, layout.text_norm, layout.text_projection
        else:
            tower, norm, projection = layout.image_tower, layout.image_norm, layout.image_projection
        return model.get_submodule(tower), _submodule(model, norm), _submodule(model, projection)

    def output_dims(self) -> dict[str, int]:
        model = unwrap(self.backbone)
        if self.layout is not None:
            dims = {}
            for modality, sub in (("text", "text_config"), ("image", "vision_config")):
                _, _, projection = self._parts(modality)
                dims[modality] = _out_width(projection, getattr(model.config, sub).hidden_size)
            return dims
        projection_dim = getattr(model.config, "projection_dim", None)
        if projection_dim is None:
            raise ValueError(
                f"cannot tell the embedding width of dual model type {model.config.model_type!r} "
                "(no projection_dim in its config)"
            )
        return {"text": projection_dim, "image": projection_dim}

    def max_text_tokens(self) -> int | None:
        return getattr(_text_config(unwrap(self.backbone).config), "max_position_embeddings", None)

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is projected."""
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def _explicit(self, modality: str, states: torch.Tensor, mask: torch.Tensor | None) -> Encoded:
        _, norm, projection = self._parts(modality)
        pooled, token_mask = _pooled(states, mask, self.pooling[modality])
        if norm is not None:
            pooled = norm(pooled)
        if projection is not None:
            pooled = projection(pooled)
        if token_mask is not None:  # the norm's bias must not resurrect zeroed padding tokens
            pooled = pooled * token_mask.unsqueeze(-1).to(pooled.dtype)
        return pooled, token_mask

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        model = unwrap(self.backbone)
        if self.pooling["text"] == "auto":
            return self._features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)), None
        tower, _, _ = self._parts("text")
        return self._explicit("text", _text_states(tower, input_ids, attention_mask), attention_mask)

    def encode_image(self, pixel_values: torch.Tensor) -> Encoded:
        model = unwrap(self.backbone)
        if self.pooling["image"] == "auto":
            return self._features(model.get_image_features(pixel_values=pixel_values)), None
        tower, _, _ = self._parts("image")
        return self._explicit("image", _image_states(tower, pixel_values), None)

    def modality_modules(self, modality: str) -> list[nn.Module] | None:
        if self.layout is None:
            return None  # where this model type keeps each tower is unknown
        return [module for module in self._parts(modality) if module is not None]

    def describe(self) -> dict[str, Any]:
        return {"reshaped_parameters": self.original_shapes}


FAMILIES: dict[str, type[EncoderFamily]] = {
    cls.name: cls for cls in (DualFamily, ComposedFamily, TextFamily, ImageFamily)
}
# The vlm family lives in its own module (which imports this one); the package imports this module first.
from vembed.model.vlm import VLMFamily, is_vlm_config  # noqa: E402

FAMILIES[VLMFamily.name] = VLMFamily


def get_family(name: str) -> type[EncoderFamily]:
    """The family class called ``name``; a ValueError lists the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)} (or 'auto')")
    return FAMILIES[name]


def _model_class(config: PretrainedConfig, source: str, trust_remote_code: bool) -> type:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if type(config) in MODEL_MAPPING:
        return MODEL_MAPPING[type(config)]
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModel" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModel"], source)
    raise ValueError(
        f"cannot tell the model family of {source!r} (model_type {config.model_type!r} has no AutoModel class"
        f"{'; it needs trust_remote_code=true' if 'AutoModel' in auto_map else ''}); set model_family to one of "
        f"{', '.join(FAMILIES)}"
    )


def detect_family(source: str, trust_remote_code: bool = False) -> str:
    """The family of the checkpoint at ``source``, read from its config (never from the id's spelling).

    vlm: the config has a ``vision_config`` and an ``image_token_id``; dual: the config's model class has
    ``get_text_features`` and ``get_image_features``; image: it takes ``pixel_values``; text: it takes ``input_ids``.
    """
    config = load_hf_config(source, trust_remote_code=trust_remote_code)
    if is_vlm_config(config):
        return "vlm"
    model_class = _model_class(config, source, trust_remote_code)
    if hasattr(model_class, "get_text_features") and hasattr(model_class, "get_image_features"):
        return "dual"
    main_input = getattr(model_class, "main_input_name", "input_ids")
    if main_input == "pixel_values":
        return "image"
    if main_input == "input_ids":
        return "text"
    raise ValueError(
        f"cannot tell the model family of {source!r}: {model_class.__name__} takes {main_input!r}; "
        f"set model_family to one of {', '.join(FAMILIES)}"
    )
