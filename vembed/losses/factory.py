"""``LossFactory``: build the configured loss (seed guide: ``vembed.losses.factory.LossFactory``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vembed.config import VEmbedConfig, as_config
from vembed.losses.base import EmbeddingLoss
from vembed.losses.matryoshka import MatryoshkaLoss
from vembed.losses.registry import get_loss_class


class LossFactory:
    """Creates losses by registered name from a config (a ``VEmbedConfig`` or a plain dict)."""

    @staticmethod
    def create(config: VEmbedConfig | Mapping[str, Any] | None = None) -> EmbeddingLoss:
        """The loss named by ``config.loss_type``, wrapped in ``MatryoshkaLoss`` when ``mrl_dims`` is set."""
        cfg = as_config(config)
        return LossFactory.create_loss(cfg.loss_type, cfg)

    @staticmethod
    def create_loss(loss_type: str, config: VEmbedConfig | Mapping[str, Any] | None = None) -> EmbeddingLoss:
        """The loss registered as ``loss_type``, configured from ``config`` (MRL-wrapped when ``mrl_dims`` is set)."""
        cfg = as_config(config)
        loss = get_loss_class(loss_type).from_config(cfg)
        if cfg.mrl_dims:
            loss = MatryoshkaLoss(loss, cfg.mrl_dims, cfg.mrl_weights)
        return loss
