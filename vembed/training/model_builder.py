"""Model construction for training, with the seed guide's signatures.

``build_model(config)`` -> :class:`~vembed.model.EmbeddingModel`; ``load_processor(name)`` -> the
:class:`~vembed.data.processing.Preprocessor` the data pipeline uses; ``apply_lora`` and ``compile_model`` switch
on LoRA and ``torch.compile`` when the config asks for them. Every function accepts a ``VEmbedConfig`` or a plain
dict (merged over ``configs/defaults.yaml``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vembed.config import VEmbedConfig, as_config
from vembed.data.processing import Preprocessor
from vembed.losses.registry import get_loss_class
from vembed.losses.scale import LogitParameters
from vembed.model import EmbeddingModel
from vembed.model import apply_lora as _apply_lora

logger = logging.getLogger(__name__)

ConfigLike = VEmbedConfig | Mapping[str, Any]


def build_model(config: ConfigLike) -> EmbeddingModel:
    """The embedding model the config describes (family, pooling, heads, dtype, gradient checkpointing), holding the
    configured loss's learnable parameters.

    A loss that learns its logit scale (``learnable_temperature``) or bias (SigLIP's ``sigmoid``) gets them from the
    model, as in open_clip: the model holds them (``model.logit_parameters``), returns them in its outputs for the
    loss and saves them; so ``build_optimizer(model, config)`` trains them whenever the loss is built. A vembed
    checkpoint that holds the same parameters continues from their saved values. LoRA is not applied here; call
    :func:`apply_lora` next (it honours ``use_lora``).
    """
    cfg = as_config(config)
    model = EmbeddingModel.from_config(cfg)
    model.logit_parameters = _logit_parameters(cfg, model.logit_parameters)
    return model


def _logit_parameters(cfg: VEmbedConfig, saved: LogitParameters | None) -> LogitParameters | None:
    """The loss's learnable parameters for the model: a checkpoint's saved ones when they are the ones the
    configured loss learns, else fresh ones from the config (None when the loss learns none)."""
    wanted = get_loss_class(cfg.loss_type).logit_parameters(cfg)
    if wanted is not None and saved is not None and saved.names == wanted.names:
        logger.info("%s: continuing from the checkpoint's learned %s", cfg.model_name, ", ".join(saved.names))
        return saved
    return wanted


def load_processor(
    model_name_or_path: str | Path, max_text_length: int | None = None, image_size: int | None = None
) -> Preprocessor:
    """The tokenizer + image processor of a model directory or hub id, as one picklable :class:`Preprocessor`."""
    return Preprocessor.from_pretrained(model_name_or_path, max_text_length=max_text_length, image_size=image_size)


def _trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters trainable ({100.0 * trainable / max(total, 1):.2f}%)"


def apply_lora(model: EmbeddingModel, config: ConfigLike, accelerator: Any | None = None) -> EmbeddingModel:
    """Add LoRA adapters to ``model`` in place when ``config.use_lora`` is true; returns ``model`` either way.

    ``accelerator`` (an ``accelerate.Accelerator``, optional) only decides which process logs the trainable
    parameter count; LoRA is applied before any distributed wrapping, so nothing else about it is needed.
    """
    cfg = as_config(config)
    if not cfg.use_lora:
        return model
    _apply_lora(model, cfg)
    if accelerator is None or getattr(accelerator, "is_main_process", True):
        logger.info("LoRA r=%d alpha=%d: %s", cfg.lora_r, cfg.lora_alpha, _trainable_summary(model))
    return model


def compile_model(model: nn.Module, config: ConfigLike, accelerator: Any | None = None) -> nn.Module:
    """``torch.compile`` the model's ``forward`` in place when ``config.torch_compile`` is true; returns ``model``.

    ``nn.Module.compile`` keeps the module's type, attributes and state-dict keys (unlike wrapping it in an
    ``OptimizedModule``), so saving and checkpointing work unchanged. ``accelerator`` is accepted for the seed
    guide's signature; compilation needs nothing from it.
    """
    cfg = as_config(config)
    if cfg.torch_compile:
        model.compile()
        if accelerator is None or getattr(accelerator, "is_main_process", True):
            logger.info("torch.compile enabled for %s.forward (torch %s)", type(model).__name__, torch.__version__)
    return model
