"""Projection heads: a bias-free linear map per modality from the encoder width to ``projection_dim``.

Heads are what make a composed model (e.g. MiniLM text + ViT image, different widths) share one embedding space,
and what ``projection_dim`` adds on top of any other family. They are ordinary ``nn.Linear`` layers (CLIP's own
projections are bias-free linears too), kept in an ``nn.ModuleDict`` keyed by modality (``"text"``, ``"image"``) and
saved to ``heads.safetensors`` by :mod:`vembed.model.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def build_heads(in_dims: Mapping[str, int], projection_dim: int, dtype: torch.dtype | None = None) -> nn.ModuleDict:
    """One ``nn.Linear(in_dim, projection_dim, bias=False)`` per modality in ``in_dims``.

    Raises:
        ValueError: ``projection_dim`` is not a positive integer.
    """
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim <= 0:
        raise ValueError(f"projection_dim must be a positive integer, got {projection_dim!r}")
    return nn.ModuleDict(
        {modality: nn.Linear(width, projection_dim, bias=False, dtype=dtype) for modality, width in in_dims.items()}
    )


def head_shapes(heads: nn.ModuleDict) -> dict[str, dict[str, int]]:
    """``{modality: {"in": in_features, "out": out_features}}``, as recorded in ``vembed.json``."""
    return {name: {"in": head.in_features, "out": head.out_features} for name, head in heads.items()}
