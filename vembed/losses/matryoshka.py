"""Matryoshka representation learning: the wrapped loss on several truncated prefixes of the embeddings.

``loss = sum_k weight_k * inner(normalize(x[..., :dim_k]))`` for query, positive and negatives.
Each prefix is L2-re-normalised, as the model does when it serves a truncated dim, so every prefix
is trained for the way it will be used. Dims and weights are kept as pairs; the full dim is only
trained if it is listed. Extra inputs (e.g. teacher embeddings) pass through untruncated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from vembed.losses.base import EmbeddingLoss, LossInputs


class MatryoshkaLoss(EmbeddingLoss):
    """Weighted sum of ``loss`` over truncated, re-normalised embedding prefixes (Kusupati et al. 2022)."""

    def __init__(self, loss: EmbeddingLoss, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        weights = [1.0] * len(dims) if weights is None or len(weights) == 0 else [float(w) for w in weights]
        if not dims:
            raise ValueError("MatryoshkaLoss needs at least one dim (mrl_dims)")
        if len(weights) != len(dims):
            raise ValueError(f"mrl_weights has {len(weights)} entries but mrl_dims has {len(dims)}; give one per dim")
        if any(d < 1 for d in dims):
            raise ValueError(f"mrl_dims must be positive, got {dims}")
        if len(set(dims)) != len(dims):
            raise ValueError(f"mrl_dims has duplicates: {dims}")
        self.loss = loss
        self.dims_and_weights = list(zip(dims, weights, strict=True))
        self.multi_vector = loss.multi_vector
        self.extra_inputs = loss.extra_inputs
        self.logit_inputs = loss.logit_inputs

    def compute(self, inputs: LossInputs) -> Tensor:
        full = inputs.query.shape[-1]
        too_big = [d for d, _ in self.dims_and_weights if d > full]
        if too_big:
            raise ValueError(f"mrl_dims {too_big} exceed the embedding dim {full}; use dims <= {full}")
        total = inputs.query.new_zeros(())
        for dim, weight in self.dims_and_weights:
            truncated = inputs.with_embeddings(lambda t, d=dim: F.normalize(t[..., :d], dim=-1))
            total = total + weight * self.loss.compute(truncated)
        return total

    def extra_repr(self) -> str:
        return f"dims_and_weights={self.dims_and_weights}"
