"""Triplet loss with the hardest negative: ``max(0, margin - s(q, p) + max_n s(q, n))``.

The negative pool is every candidate that is not a positive of the query: other queries'
positives in the (gathered) batch and all hard negatives (with labels, same-label candidates are
excluded). ``s`` is the dot product (cosine for normalised embeddings), so the margin is in cosine
units. A query with no negative at all contributes 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vembed.config import VEmbedConfig
from vembed.losses.base import EmbeddingLoss, LossInputs, check_class_labels
from vembed.losses.candidates import collect_candidates
from vembed.losses.registry import register_loss


@register_loss("triplet")
class TripletLoss(EmbeddingLoss):
    """Margin ranking of each query's positive above its hardest negative."""

    def __init__(self, margin: float = 0.2, gather_across_workers: bool = True) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"triplet_margin must be >= 0, got {margin}")
        self.margin = margin
        self.gather_across_workers = gather_across_workers

    @classmethod
    def from_config(cls, config: VEmbedConfig) -> TripletLoss:
        return cls(margin=config.triplet_margin, gather_across_workers=config.gather_across_workers)

    def compute(self, inputs: LossInputs) -> Tensor:
        check_class_labels(inputs.labels, "triplet")
        cands = collect_candidates(
            inputs.positive, inputs.negatives, inputs.labels, anchor_dim=2, gather=self.gather_across_workers
        )
        positive_score = (inputs.query * inputs.positive).sum(dim=-1)
        negative_scores = (inputs.query @ cands.embeddings.T).masked_fill(cands.is_positive, float("-inf"))
        hardest = negative_scores.max(dim=-1).values
        has_negative = torch.isfinite(hardest)
        hinge = torch.relu(self.margin - positive_score + hardest.masked_fill(~has_negative, 0.0))
        return cands.share_of_mean(hinge * has_negative)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
