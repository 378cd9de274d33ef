"""InfoNCE over each query's own positive and only its ``k`` hardest in-batch negatives.

The pool is every (gathered) candidate that is not a positive of the query: other queries'
positives and all hard negatives (with labels, same-label candidates are excluded). Keeping only
the top-``k`` scoring ones focuses the gradient on confusable pairs (cf. ANCE-style mining, done
in-batch). Fewer than ``k`` negatives available: all of them are used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vembed.config import VEmbedConfig
from vembed.losses.base import EmbeddingLoss, LossInputs, check_class_labels, learnable_temperature_parameters
from vembed.losses.candidates import collect_candidates
from vembed.losses.registry import register_loss
from vembed.losses.scale import LogitParameters, LogitScale


@register_loss("hard_mining")
class HardMiningLoss(EmbeddingLoss):
    """Cross-entropy of the positive against the top-``k`` hardest negatives per query."""

    def __init__(
        self,
        k: int = 4,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        gather_across_workers: bool = True,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"hard_mining_k must be >= 1, got {k}")
        self.k = k
        self.logit_scale = LogitScale(temperature, learnable_temperature)
        self.gather_across_workers = gather_across_workers

    logit_inputs = ("logit_scale",)

    @classmethod
    def logit_parameters(cls, config: VEmbedConfig) -> LogitParameters | None:
        return learnable_temperature_parameters(config)

    @classmethod
    def from_config(cls, config: VEmbedConfig) -> HardMiningLoss:
        return cls(
            k=config.hard_mining_k,
            temperature=config.temperature,
            learnable_temperature=config.learnable_temperature,
            gather_across_workers=config.gather_across_workers,
        )

    def compute(self, inputs: LossInputs) -> Tensor:
        check_class_labels(inputs.labels, "hard_mining")
        cands = collect_candidates(
            inputs.positive, inputs.negatives, inputs.labels, anchor_dim=2, gather=self.gather_across_workers
        )
        logits = inputs.scale(self.logit_scale) * inputs.query @ cands.embeddings.T
        positive = logits.gather(1, cands.own_positive[:, None])
        negatives = logits.masked_fill(cands.is_positive, float("-inf"))
        hardest = negatives.topk(min(self.k, logits.shape[1]), dim=-1).values  # -inf where too few negatives
        nll = -torch.log_softmax(torch.cat([positive, hardest], dim=-1), dim=-1)[:, 0]
        return cands.share_of_mean(nll)

    def extra_repr(self) -> str:
        return f"k={self.k}"
