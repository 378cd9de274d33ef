"""Late-interaction (ColBERT) contrastive loss over token embeddings with padding masks.

``score(q, d) = sum_{i in q} max_{j in d} <q_i, d_j>`` over real tokens only (see
:func:`vembed.maxsim.maxsim`, the one MaxSim), then the same contrastive cross-entropy as
InfoNCE over every (gathered) positive and hard negative, scaled by ``1 / temperature``
(Khattab & Zaharia 2020 train with this in-batch softmax). Scores are sums over query tokens, so
they grow with the query length: pick the temperature accordingly. Labels work as in InfoNCE.
Inputs: ``query`` ``[B, Lq, D]``, ``positive`` ``[B, Lp, D]``, negatives ``[K, Ln, D]`` or
``[B, K, Ln, D]``, masks without the ``D`` dim (True/1 = real token; None = no padding).
"""

from __future__ import annotations

from torch import Tensor

from vembed.config import VEmbedConfig
from vembed.losses.base import EmbeddingLoss, LossInputs, check_class_labels, learnable_temperature_parameters
from vembed.losses.candidates import collect_candidates
from vembed.losses.functional import contrastive_nll
from vembed.losses.registry import register_loss
from vembed.losses.scale import LogitParameters, LogitScale
from vembed.maxsim import maxsim


def _check_has_tokens(name: str, mask: Tensor | None) -> None:
    if mask is not None and not mask.bool().flatten(0, -2).any(dim=-1).all():
        raise ValueError(f"'{name}' masks out every token of at least one item; each item needs one real token")


@register_loss("maxsim")
class MaxSimLoss(EmbeddingLoss):
    """Contrastive loss on ColBERT MaxSim scores of multi-vector embeddings."""

    multi_vector = True

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        gather_across_workers: bool = True,
    ) -> None:
        super().__init__()
        self.logit_scale = LogitScale(temperature, learnable_temperature)
        self.gather_across_workers = gather_across_workers

    logit_inputs = ("logit_scale",)

    @classmethod
    def logit_parameters(cls, config: VEmbedConfig) -> LogitParameters | None:
        return learnable_temperature_parameters(config)

    @classmethod
    def from_config(cls, config: VEmbedConfig) -> MaxSimLoss:
        return cls(
            temperature=config.temperature,
            learnable_temperature=config.learnable_temperature,
            gather_across_workers=config.gather_across_workers,
        )

    def compute(self, inputs: LossInputs) -> Tensor:
        check_class_labels(inputs.labels, "maxsim")
        for name in ("query_mask", "positive_mask", "negative_mask"):
            _check_has_tokens(name, getattr(inputs, name))
        cands = collect_candidates(
            inputs.positive,
            inputs.negatives,
            inputs.labels,
            anchor_dim=3,
            paired_mask=inputs.positive_mask,
            negative_mask=inputs.negative_mask,
            gather=self.gather_across_workers,
        )
        scores = maxsim(inputs.query, inputs.query_mask, cands.embeddings, cands.token_mask)
        return cands.share_of_mean(contrastive_nll(inputs.scale(self.logit_scale) * scores, cands.is_positive))
