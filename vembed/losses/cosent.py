"""CoSENT: rank scored (query, positive) pairs by their similarity, all pairs against all pairs.

Input: ``query[b]`` and ``positive[b]`` form pair ``b`` and ``labels[b]`` is its float gold score
(e.g. STS similarity in [0, 5]); only the order of the scores matters. With ``s_b`` the pair's
similarity (dot product, cosine for normalised embeddings) and ``scale`` the CoSENT scale::

    loss = log(1 + sum_{(i, j): labels_i > labels_j} exp(scale * (s_j - s_i)))

(Su 2022). Hard negatives carry no gold score, so they are rejected: pass them as pairs with a
low score instead. The sum runs over every pair of pairs in the batch, so with
``gather_across_workers`` the scores and labels of all ranks are gathered and every rank computes
the same global loss; the gather's summed backward and DDP's averaging then give the
single-process gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vembed.config import VEmbedConfig
from vembed.losses.base import EmbeddingLoss, LossInputs
from vembed.losses.distributed import gather_with_grad
from vembed.losses.registry import register_loss


@register_loss("cosent")
class CoSENTLoss(EmbeddingLoss):
    """Pairwise ranking of scored pairs (labels = float gold similarity per pair)."""

    def __init__(self, scale: float = 20.0, gather_across_workers: bool = True) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"cosent_scale must be > 0, got {scale}")
        self.scale = scale
        self.gather_across_workers = gather_across_workers

    @classmethod
    def from_config(cls, config: VEmbedConfig) -> CoSENTLoss:
        return cls(scale=config.cosent_scale, gather_across_workers=config.gather_across_workers)

    def compute(self, inputs: LossInputs) -> Tensor:
        if inputs.labels is None:
            raise ValueError("cosent needs labels: one gold similarity score per (query, positive) pair, shape [B]")
        if inputs.negatives is not None:
            raise ValueError(
                "cosent scores (query, positive) pairs only; pass hard negatives as pairs with a low score"
            )
        scores = (inputs.query * inputs.positive).sum(dim=-1)
        gold = inputs.labels.to(scores.dtype)
        if self.gather_across_workers:
            scores, gold = gather_with_grad(scores), gather_with_grad(gold)
        diffs = self.scale * (scores[None, :] - scores[:, None])  # [i, j] = scale * (s_j - s_i)
        ordered = gold[:, None] > gold[None, :]  # pair i should score above pair j
        terms = torch.cat([diffs.new_zeros(1), diffs[ordered]])
        return torch.logsumexp(terms, dim=0)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
