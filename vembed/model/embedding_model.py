"""``EmbeddingModel``: the one model class that training, evaluation, batch embedding and serving share.

An EmbeddingModel is an encoder family (:mod:`vembed.model.families`: dual / composed / text / image) plus optional
projection heads (:mod:`vembed.model.heads`), with every output passed through
:func:`~vembed.model.postprocess.finalize_embeddings` (Matryoshka truncation, then L2 normalisation).

Outputs: ``[B, D]`` embeddings, or with ``pooling_method="none"`` (multi-vector, late interaction) a pair
``(token embeddings [B, L, D], mask [B, L])`` whose padding tokens are zero. Which tokens the mask keeps is the
model's ``vector_tokens`` (:data:`vembed.model.checkpoint.VECTOR_TOKENS`), decided at construction and saved.

Multimodal queries (``encode`` with both text and image, e.g. the m2i retrieval mode) are fused as the sum of the
L2-normalised text and image embeddings, then finalised (so with ``normalize=True`` the result is the normalised
mean direction of the two). Multi-vector fusion concatenates the text and image tokens (and their masks).

A model trained with a loss that learns its logit scale (and SigLIP's bias) holds them as ``logit_parameters`` (a
:class:`~vembed.losses.scale.LogitParameters`, attached by ``build_model(config)``, saved and loaded with the model, as
open_clip's CLIP holds ``logit_scale``); :meth:`EmbeddingModel.forward` adds them to its outputs for the loss.

Under FSDP2, call the model itself (``forward``) rather than ``encode_*``: FSDP's hooks run around ``forward``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vembed.config import VEmbedConfig, as_config, load_base_config
from vembed.losses.scale import LogitParameters
from vembed.model.checkpoint import (
    VECTOR_TOKENS,
    ModelSpec,
    is_vembed_checkpoint,
    load_family,
    load_heads,
    load_logit_parameters,
    read_spec,
    save_model,
)
from vembed.model.families import ComposedFamily, EncoderFamily, detect_family, get_family
from vembed.model.heads import build_heads, head_shapes
from vembed.model.hf import DTYPES, resolve_source, unwrap
from vembed.model.postprocess import finalize_embeddings
from vembed.model.vlm import check_sequence_batch

Embeddings = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

#: batch roles -> output key of their embeddings (negatives carry an extra K axis)
ROLES: dict[str, str] = {"query": "query", "positive": "positive", "negative": "negatives"}


class EmbeddingModel(nn.Module):
    """Text / image / multimodal embedding model over one encoder family.

    Build it with :meth:`from_pretrained` or :meth:`from_config`; the constructor takes an already loaded family.

    Args:
        encoder: the loaded encoder family.
        projection_dim: add one bias-free linear head per modality to this dim (required when the family's
            modalities have different widths); None keeps the encoder's own width.
        normalize: L2-normalise outputs.
        mrl_dims: Matryoshka dims the model is trained for (each must be <= the embedding dim).
        pooling_method: the configured pooling (``auto`` or a method); the family holds the resolved one.
        heads: pre-built heads (loading a checkpoint); default builds fresh ones from ``projection_dim``.
        vector_tokens: a multi-vector model's tokens: ``non_padding``, ``content`` (vlm only) or ``auto``
            (``content`` for vlm, else ``non_padding``); must stay ``auto`` for single-vector models.
        logit_parameters: the training loss's learnable scale / bias (see the module docstring); None: none.
    """

    def __init__(
        self,
        encoder: EncoderFamily,
        projection_dim: int | None = None,
        normalize: bool = True,
        mrl_dims: Sequence[int] = (),
        pooling_method: str = "auto",
        heads: nn.ModuleDict | None = None,
        vector_tokens: str = "auto",
        logit_parameters: LogitParameters | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self._vector_tokens = _resolve_vector_tokens(vector_tokens, encoder)
        widths = encoder.output_dims()
        if projection_dim is None and len(set(widths.values())) > 1:
            raise ValueError(
                f"the {encoder.name} encoder's outputs have different widths {widths}; set projection_dim so that "
                "both modalities are projected into one shared space"
            )
        dtype = next(encoder.parameters()).dtype
        head_widths = encoder.head_dims()
        self.heads = heads if heads is not None else nn.ModuleDict()
        if heads is None and projection_dim is not None:
            self.heads = build_heads(head_widths, projection_dim, dtype=dtype)
        for modality, head in self.heads.items():
            if modality not in head_widths or head.in_features != head_widths[modality]:
                raise ValueError(
                    f"{modality} head expects width {head.in_features}, the encoder gives {head_widths.get(modality)}"
                )
        self.projection_dim = projection_dim
        self.normalize = normalize
        #: preprocessing settings chosen for this model (config keys / a checkpoint's saved ones), recorded on save
        self.preprocessing: dict[str, Any] = {}
        self._pooling_method = pooling_method
        self.mrl_dims = [int(d) for d in mrl_dims]
        bad = [d for d in self.mrl_dims if not 0 < d <= self.embedding_dim]
        if bad:
            raise ValueError(
                f"mrl_dims {bad} are outside 1..{self.embedding_dim} (the model's embedding dim); "
                "use Matryoshka dims no larger than the embedding"
            )
        #: the loss's learnable logit scale / bias (registered last: after the encoder's and heads' parameters)
        self.logit_parameters = logit_parameters

    # ---------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, **overrides: Any) -> EmbeddingModel:
        """Load a vembed-saved directory, or a raw Hugging Face directory / hub id.

        ``overrides`` are configuration keys (``pooling_method``, ``projection_dim``, ``normalize``, ``mrl_dims``,
        ``model_family``, ``torch_dtype``, ``trust_remote_code``, ``gradient_checkpointing``, ...).

        Raises:
            FileNotFoundError: the path does not exist (its name is in the message).
            ValueError: the requested family does not fit the checkpoint, or an unknown family.
        """
        return cls.from_config(as_config({**overrides, "model_name": str(path_or_id)}, source="from_pretrained"))

    @classmethod
    def from_config(cls, config: VEmbedConfig | Mapping[str, Any]) -> EmbeddingModel:
        """Build from a config: ``model_name`` (a vembed save, HF directory or hub id), or for the composed family
        ``text_model_name`` + ``image_model_name``; then ``pooling_method``, ``projection_dim``, ``normalize``,
        ``mrl_dims``, ``trust_remote_code``, ``torch_dtype`` and ``gradient_checkpointing``.

        For a vembed-saved directory the saved settings hold, except where the config sets a non-default value:
        ``pooling_method``, ``normalize`` and ``mrl_dims`` then override the saved ones, while a different
        ``model_family`` or ``projection_dim`` is an error (they define the saved weights).
        """
        cfg = as_config(config)
        if cfg.model_family != "auto":
            get_family(cfg.model_family)
        if cfg.model_name is not None and is_vembed_checkpoint(resolve_source(cfg.model_name)):
            model = cls._from_checkpoint(resolve_source(cfg.model_name), cfg)
        else:
            family = cls._load_family(cfg)
            model = cls(
                family,
                projection_dim=cfg.projection_dim,
                normalize=cfg.normalize,
                mrl_dims=cfg.mrl_dims,
                pooling_method=cfg.pooling_method,
                vector_tokens=cfg.vector_tokens,
            )
        model.preprocessing = _preprocessing_choices(cfg, model.preprocessing)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    @staticmethod
    def _load_family(cfg: VEmbedConfig) -> EncoderFamily:
        wants_composed = cfg.model_family == "composed" or (
            cfg.model_name is None and (cfg.text_model_name or cfg.image_model_name)
        )
        load_args = dict(pooling=cfg.pooling_method, dtype=cfg.torch_dtype, trust_remote_code=cfg.trust_remote_code)
        if wants_composed:
            if cfg.model_name is not None or not (cfg.text_model_name and cfg.image_model_name):
                raise ValueError(
                    "the composed family takes text_model_name and image_model_name (and no model_name, unless it is "
                    f"a saved vembed model); got model_name={cfg.model_name!r}, "
                    f"text_model_name={cfg.text_model_name!r}, image_model_name={cfg.image_model_name!r}"
                )
            sources = {
                "text_encoder": resolve_source(cfg.text_model_name),
                "image_encoder": resolve_source(cfg.image_model_name),
            }
            return ComposedFamily.load(sources, **load_args)
        if cfg.model_name is None:
            raise ValueError("set model_name (or text_model_name and image_model_name for a composed model)")
        source = resolve_source(cfg.model_name)
        detected = detect_family(source, trust_remote_code=cfg.trust_remote_code)
        if cfg.model_family not in ("auto", detected):
            raise ValueError(
                f"model_family={cfg.model_family!r} does not fit {source}: its config describes a {detected!r} model"
            )
        return get_family(detected).load({"backbone": source}, **load_args)

    @classmethod
    def _from_checkpoint(cls, directory: str, cfg: VEmbedConfig) -> EmbeddingModel:
        spec = read_spec(directory)
        defaults = load_base_config()
        if cfg.model_family not in ("auto", spec.family):
            raise ValueError(
                f"model_family={cfg.model_family!r} does not fit {directory}, a saved {spec.family!r} model"
            )
        if cfg.projection_dim is not None and cfg.projection_dim != spec.projection_dim:
            raise ValueError(
                f"projection_dim={cfg.projection_dim} does not fit {directory}, saved with projection_dim="
                f"{spec.projection_dim}; drop the override to load it"
            )
        pooling_method, pooling = spec.pooling_method, spec.pooling
        if cfg.pooling_method != "auto":
            pooling_method, pooling = cfg.pooling_method, {m: cfg.pooling_method for m in spec.pooling}
        normalize = cfg.normalize if cfg.normalize != defaults.normalize else spec.normalize
        mrl_dims = cfg.mrl_dims if cfg.mrl_dims != defaults.mrl_dims else spec.mrl_dims
        vector_tokens = cfg.vector_tokens
        if vector_tokens == "auto" and all(method == "none" for method in pooling.values()):
            vector_tokens = spec.vector_tokens or "auto"
        family = load_family(directory, spec, pooling, cfg.torch_dtype, cfg.trust_remote_code)
        heads = load_heads(directory, spec, DTYPES[cfg.torch_dtype])
        model = cls(
            family,
            projection_dim=spec.projection_dim,
            normalize=normalize,
            mrl_dims=mrl_dims,
            pooling_method=pooling_method,
            heads=heads,
            vector_tokens=vector_tokens,
            logit_parameters=load_logit_parameters(directory, spec),
        )
        model.preprocessing = dict(spec.preprocessing)
        return model

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def family(self) -> str:
        """The encoder family: ``dual``, ``composed``, ``text``, ``image`` or ``vlm``."""
        return self.encoder.name

    @property
    def pooling_method(self) -> str:
        """The configured pooling method (``auto`` or ``cls``/``mean``/``last``/``none``)."""
        return self._pooling_method

    @property
    def pooling(self) -> dict[str, str]:
        """The pooling actually applied per modality (``auto`` resolved; ``auto`` stays for dual = own path)."""
        return dict(self.encoder.pooling)

    @property
    def multi_vector(self) -> bool:
        """True when outputs are token embeddings + masks (``pooling_method="none"``)."""
        return all(method == "none" for method in self.encoder.pooling.values())

    @property
    def vector_tokens(self) -> str | None:
        """Which tokens are an item's vectors when multi-vector (saved in ``vembed.json``; see
        :data:`vembed.model.checkpoint.VECTOR_TOKENS`), i.e. the mask ``encode_*`` returns: ``non_padding`` or,
        for a vlm, ``content`` (its text and image tokens). None for single-vector models."""
        return self._vector_tokens

    @property
    def modalities(self) -> tuple[str, ...]:
        """The inputs this model encodes: ``("text",)``, ``("image",)`` or both."""
        return self.encoder.modalities

    @property
    def embedding_dim(self) -> int:
        """Width of the returned embeddings (before any Matryoshka truncation)."""
        if self.projection_dim is not None:
            return self.projection_dim
        return next(iter(self.encoder.output_dims().values()))

    def spec(self) -> ModelSpec:
        """What ``vembed.json`` records about this model."""
        return ModelSpec(
            family=self.family,
            pooling_method=self.pooling_method,
            pooling=self.pooling,
            projection_dim=self.projection_dim,
            normalize=self.normalize,
            mrl_dims=list(self.mrl_dims),
            embedding_dim=self.embedding_dim,
            heads=head_shapes(self.heads),
            family_info=self.encoder.describe(),
            vector_tokens=self.vector_tokens,
            logit_parameters=list(self.logit_parameters.names) if self.logit_parameters is not None else [],
        )

    # -------------------------------------------------------------------------------------------- model switches
    def enable_gradient_checkpointing(self) -> None:
        """Recompute backbone activations in backward (non-reentrant) to save memory.

        Raises:
            ValueError: a backbone that does not support gradient checkpointing.
        """
        for attr, backbone in self.encoder.backbones().items():
            model = unwrap(backbone)
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(model).__name__} ({attr}) does not support gradient checkpointing")
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def freeze_modalities_except(self, used: Collection[str]) -> bool:
        """Freeze the tower(s) and head of every modality not in ``used`` (a t2t run never encodes images).

        Data-parallel training needs it: DDP expects a gradient for every trainable parameter at every step.
        Returns False, freezing nothing, when the family cannot tell which parameters belong to a modality.
        """
        unused = [m for m in self.modalities if m not in used]
        modules = {m: self.encoder.modality_modules(m) for m in unused}
        if any(found is None for found in modules.values()):
            return False
        for modality, found in modules.items():
            for module in [*found, *([self.heads[modality]] if modality in self.heads else [])]:
                module.requires_grad_(False)
        return True

    def no_split_module_classes(self) -> list[str]:
        """Class names of the backbone blocks FSDP2 should shard one by one (the HF ``_no_split_modules``)."""
        names: set[str] = set()
        for backbone in self.encoder.backbones().values():
            names.update(getattr(unwrap(backbone), "_no_split_modules", None) or ())
        return sorted(names)

    def save_pretrained(self, directory: str | Path, merge_lora: bool = True) -> Path:
        """Save as a vembed model directory (see :mod:`vembed.model.checkpoint`); returns the directory."""
        return save_model(self, directory, merge_lora=merge_lora)

    # ------------------------------------------------------------------------------------------------- encoding
    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, tokens] tensor, got {shape}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        limit = self.encoder.max_text_tokens()
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(
                f"input_ids have {input_ids.shape[1]} tokens but the text encoder takes at most {limit}; "
                f"lower max_text_length to <= {limit}"
            )
        return input_ids.long(), attention_mask.long()

    def _check_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a [batch, 3, height, width] tensor, got {shape}")
        return pixel_values.to(self._dtype)

    def _text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Embeddings:
        """Text embeddings after the head, before finalisation."""
        emb, mask = self.encoder.encode_text(*self._check_text(input_ids, attention_mask))
        emb = self.heads["text"](emb) if "text" in self.heads else emb
        return emb if mask is None else (emb, mask)

    def _image(self, pixel_values: torch.Tensor) -> Embeddings:
        """Image embeddings after the head, before finalisation."""
        emb, mask = self.encoder.encode_image(self._check_image(pixel_values))
        emb = self.heads["image"](emb) if "image" in self.heads else emb
        return emb if mask is None else (emb, mask)

    def _finalize(self, output: Embeddings, dim: int | None) -> Embeddings:
        if isinstance(output, tuple):
            emb, mask = output
            return finalize_embeddings(emb, dim, self.normalize), mask
        return finalize_embeddings(output, dim, self.normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, dim: int | None = None
    ) -> Embeddings:
        """Embed tokenised texts ``[B, L]``: ``[B, D]`` (or ``(tokens [B, L, D], mask [B, L])`` multi-vector).

        ``dim`` truncates to a Matryoshka prefix (re-normalised); None returns the full embedding.
        """
        if self.sequence_inputs:
            return self._finalize(self._sequence(input_ids, attention_mask, None, None, None), dim)
        return self._finalize(self._text(input_ids, attention_mask), dim)

    def encode_image(self, pixel_values: torch.Tensor, dim: int | None = None) -> Embeddings:
        """Embed processed images ``[B, 3, H, W]``: ``[B, D]`` (or tokens + mask multi-vector).

        A vlm model has no image-only path (an image is part of a sequence): this raises and says to use
        :meth:`encode` with the VLM batch format.
        """
        if self.sequence_inputs:
            self.encoder.encode_image(pixel_values)
        return self._finalize(self._image(pixel_values), dim)

    @property
    def sequence_inputs(self) -> bool:
        """True for families that take every item as one token sequence (vlm): see :meth:`encode`."""
        return bool(getattr(self.encoder, "sequence_inputs", False))

    def _sequence(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mm_token_type_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        prefix: str = "",
        content_mask: torch.Tensor | None = None,
    ) -> Embeddings:
        """A sequence family's embeddings (one forward for the whole batch) after the head, before finalisation."""
        if input_ids is None:
            raise ValueError(
                f"a {self.family} model embeds every item as a token sequence: {prefix}input_ids are required "
                "(images are image tokens inside it); build the batch with the model's preprocessing"
            )
        ids, mask, mm = check_sequence_batch(
            input_ids,
            attention_mask,
            mm_token_type_ids,
            pixel_values,
            image_grid_thw,
            image_token_id=self.encoder.image_token_id,
            merge_size=self.encoder.merge_size,
            prefix=prefix,
        )
        self._check_text(ids, mask)
        pixels = pixel_values.to(self._dtype) if pixel_values is not None else None
        emb, token_mask = self.encoder.encode_sequence(ids, mask, mm, pixels, image_grid_thw)
        emb = self.heads["sequence"](emb) if "sequence" in self.heads else emb
        if token_mask is not None and self.vector_tokens == "content":
            token_mask = _content_tokens(content_mask, mask, prefix)
            emb = emb * token_mask[..., None].to(emb.dtype)
        return emb if token_mask is None else (emb, token_mask)

    def encode(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        dim: int | None = None,
        *,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        content_mask: torch.Tensor | None = None,
    ) -> Embeddings:
        """Embed text, images, or both (a multimodal query, fused as described in the module docstring).

        A sequence family (vlm) takes the VLM batch format instead: ``input_ids``, ``attention_mask`` and
        ``mm_token_type_ids`` ``[B, L]`` plus, when items have images, flat ``pixel_values [sum P_i, C]`` and
        ``image_grid_thw [N_images, 3]``; each item (text, image(s), or images then text) is ONE sequence and one
        forward embeds the whole batch -- a mixed item is never the sum of two vectors. ``content_mask`` ``[B, L]``
        (from the same preprocessing) marks each item's text and image tokens: the vectors a ``vector_tokens:
        content`` model keeps.
        """
        if self.sequence_inputs:
            encoded = self._sequence(
                input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw, content_mask=content_mask
            )
            return self._finalize(encoded, dim)
        if mm_token_type_ids is not None or image_grid_thw is not None or content_mask is not None:
            raise ValueError(
                "mm_token_type_ids / image_grid_thw / content_mask are inputs of vision-language (vlm) models; this "
                f"is a {self.family} model"
            )
        if input_ids is None and pixel_values is None:
            raise ValueError("encode needs input_ids (text), pixel_values (images), or both")
        if pixel_values is None:
            return self.encode_text(input_ids, attention_mask, dim)
        if input_ids is None:
            return self.encode_image(pixel_values, dim)
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"a multimodal query needs as many texts as images, got {input_ids.shape[0]} texts and "
                f"{pixel_values.shape[0]} images"
            )
        text, image = self._text(input_ids, attention_mask), self._image(pixel_values)
        if isinstance(text, tuple):
            fused = (torch.cat([text[0], image[0]], dim=1), torch.cat([text[1], image[1]], dim=1))
        else:
            fused = F.normalize(text, dim=-1) + F.normalize(image, dim=-1)
        return self._finalize(fused, dim)

    # -------------------------------------------------------------------------------------------------- training
    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        """Embed a training batch.

        Reads ``{role}_input_ids`` / ``{role}_attention_mask`` ``[B, L]`` and/or ``{role}_pixel_values``
        ``[B, 3, H, W]`` for the roles ``query``, ``positive`` and ``negative`` (negatives carry an extra ``K``
        axis: ``[B, K, L]`` / ``[B, K, 3, H, W]``). Other keys (e.g. ``labels``) are ignored. A vlm model reads
        the VLM batch format per role instead: ``{role}_input_ids`` / ``_attention_mask`` / ``_mm_token_type_ids``
        / ``_content_mask`` (negatives ``[B, K, L]``), flat ``{role}_pixel_values [sum P, C]`` and
        ``{role}_image_grid_thw [N, 3]`` in item order (negatives: item-major, then K).

        Returns:
            ``{"query": [B, D], "positive": [B, D], "negatives": [B, K, D]}`` for the roles present; multi-vector
            models return ``[B, L, D]`` / ``[B, K, L, D]`` plus ``query_mask``, ``positive_mask``, ``negative_mask``.
            A model holding ``logit_parameters`` adds them: ``logit_scale`` (and ``logit_bias``), 0-dim.

        Raises:
            ValueError: no role present, or a role's tensors have the wrong number of axes.
        """
        out: dict[str, torch.Tensor] = {}
        for role, key in ROLES.items():
            ids, mask, pixels = (batch.get(f"{role}_{n}") for n in ("input_ids", "attention_mask", "pixel_values"))
            if ids is None and pixels is None:
                continue
            lead: tuple[int, ...] = ()
            if self.sequence_inputs:
                mm, grid = batch.get(f"{role}_mm_token_type_ids"), batch.get(f"{role}_image_grid_thw")
                content = batch.get(f"{role}_content_mask")
                if role == "negative":
                    ids, mask, mm, content, lead = _flatten_negative_sequences(ids, mask, mm, content)
                encoded = self._sequence(ids, mask, mm, pixels, grid, prefix=f"{role}_", content_mask=content)
                encoded = self._finalize(encoded, None)
            else:
                if role == "negative":
                    ids, mask, pixels, lead = _flatten_negatives(ids, mask, pixels)
                encoded = self.encode(ids, mask, pixels)
            emb, token_mask = encoded if isinstance(encoded, tuple) else (encoded, None)
            out[key] = emb.reshape(*lead, *emb.shape[1:]) if lead else emb
            if token_mask is not None:
                out[f"{role}_mask"] = token_mask.reshape(*lead, *token_mask.shape[1:]) if lead else token_mask
        if not out:
            expected = ", ".join(f"{r}_input_ids/{r}_pixel_values" for r in ROLES)
            raise ValueError(f"the batch has no inputs for any role; expected some of {expected}; got {sorted(batch)}")
        if self.logit_parameters is not None:
            out.update(self.logit_parameters())  # inside forward: DDP and FSDP2 see them used
        return out

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, pooling={self.pooling}, embedding_dim={self.embedding_dim}, "
            f"normalize={self.normalize}, mrl_dims={self.mrl_dims}"
        )


#: the configuration keys that are preprocessing settings (``vembed.data.processing.SETTINGS_KEYS``)
PREPROCESSING_CONFIG_KEYS = (
    "max_text_length",
    "image_size",
    "image_min_pixels",
    "image_max_pixels",
    "query_instruction",
    "document_instruction",
)


def _preprocessing_choices(cfg: VEmbedConfig, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved preprocessing settings with the config's set (non-null) keys over them."""
    return {**saved, **{key: cfg[key] for key in PREPROCESSING_CONFIG_KEYS if cfg[key] is not None}}


def _flatten_negative_sequences(*rows: torch.Tensor | None) -> tuple[Any, ...]:
    """VLM negatives ``[B, K, L]`` (ids, then masks and token types) -> ``[B*K, L]`` each, plus the ``(B, K)``
    to restore (their flat patches are already in item order)."""
    ids = rows[0]
    if ids is None or ids.dim() != 3:
        shape = None if ids is None else tuple(ids.shape)
        raise ValueError(f"negative_input_ids must be [batch, negatives, tokens] for a vlm model, got {shape}")
    lead = tuple(ids.shape[:2])
    return (*(t.reshape(-1, t.shape[-1]) if t is not None else None for t in rows), lead)


def _resolve_vector_tokens(vector_tokens: str, encoder: EncoderFamily) -> str | None:
    """The tokens a model's multi-vector items keep (None when single-vector); see :class:`EmbeddingModel`."""
    multi = all(method == "none" for method in encoder.pooling.values())
    sequence = bool(getattr(encoder, "sequence_inputs", False))
    if vector_tokens not in ("auto", *VECTOR_TOKENS):
        raise ValueError(f"vector_tokens={vector_tokens!r} is not one of auto, {', '.join(VECTOR_TOKENS)}")
    if not multi:
        if vector_tokens != "auto":
            raise ValueError(
                f"vector_tokens={vector_tokens} applies to multi-vector models only (pooling_method: none); this "
                f"{encoder.name} model pools {dict(encoder.pooling)}"
            )
        return None
    if vector_tokens == "content" and not sequence:
        raise ValueError(
            f"vector_tokens=content keeps a vision-language model's text and image tokens without its chat template; "
            f"this is a {encoder.name} model: use vector_tokens: non_padding"
        )
    if vector_tokens == "auto":
        return "content" if sequence else "non_padding"
    return vector_tokens


def _content_tokens(content_mask: torch.Tensor | None, attention_mask: torch.Tensor, prefix: str) -> torch.Tensor:
    """The checked content-token mask ``[B, L]`` (long) of a ``vector_tokens: content`` batch."""
    if content_mask is None:
        raise ValueError(
            f"{prefix}content_mask is missing: this multi-vector vlm model keeps only each item's content tokens "
            "(vector_tokens: content); build the batch with the model's preprocessing (process_conversations), "
            "which returns content_mask beside input_ids"
        )
    if tuple(content_mask.shape) != tuple(attention_mask.shape):
        raise ValueError(
            f"{prefix}content_mask shape {tuple(content_mask.shape)} differs from {prefix}input_ids "
            f"{tuple(attention_mask.shape)}"
        )
    keep = content_mask.to(attention_mask.device).bool() & attention_mask.bool()
    empty = (~keep.any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{prefix}content_mask marks no token of item(s) {empty[:5].tolist()}; each needs >= 1")
    return keep.long()


def _flatten_negatives(
    ids: torch.Tensor | None, mask: torch.Tensor | None, pixels: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, tuple[int, ...]]:
    """``[B, K, ...]`` negatives -> ``[B*K, ...]`` plus the ``(B, K)`` to restore."""
    lead: tuple[int, ...] = ()
    if ids is not None:
        if ids.dim() != 3:
            raise ValueError(f"negative_input_ids must be [batch, negatives, tokens], got {tuple(ids.shape)}")
        lead = tuple(ids.shape[:2])
        ids = ids.reshape(-1, ids.shape[-1])
        mask = mask.reshape(-1, mask.shape[-1]) if mask is not None else None
    if pixels is not None:
        if pixels.dim() != 5:
            raise ValueError(f"negative_pixel_values must be [batch, negatives, 3, H, W], got {tuple(pixels.shape)}")
        if lead and tuple(pixels.shape[:2]) != lead:
            raise ValueError(f"negative texts {lead} and negative images {tuple(pixels.shape[:2])} differ in [B, K]")
        lead = tuple(pixels.shape[:2])
        pixels = pixels.reshape(-1, *pixels.shape[2:])
    return ids, mask, pixels, lead
