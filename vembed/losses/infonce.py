"""InfoNCE with in-batch and hard negatives, optional reverse term, labels and learnable temperature.

For each query ``q_b`` the candidates are every positive of the (gathered) batch and every explicit
negative, shared or per query (per-query negatives of other queries included, see
:mod:`vembed.losses.candidates`). The loss is the cross-entropy of picking ``q_b``'s own positive::

    l_b = -log( exp(s(q_b, p_b) / t) / sum_c exp(s(q_b, c) / t) )

With ``labels`` every candidate positive of the same label counts as a positive (supervised
contrastive, averaged over those positives). With ``bidirectional`` the candidate -> query term is
added (each positive against all queries of the batch; hard negatives have no query so they only
appear in the query -> candidate term) and the two terms are averaged, as in CLIP.
"""

from __future__ import annotations

from torch import Tensor

from vembed.config import VEmbedConfig
from vembed.losses.base import EmbeddingLoss, LossInputs, check_class_labels, learnable_temperature_parameters
from vembed.losses.candidates import collect_candidates
from vembed.losses.functional import contrastive_nll
from vembed.losses.registry import register_loss
from vembed.losses.scale import LogitParameters, LogitScale


@register_loss("infonce")
class InfoNCELoss(EmbeddingLoss):
    """Contrastive cross-entropy over in-batch positives and hard negatives (a.k.a. MNRL, CLIP loss)."""

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        bidirectional: bool = True,
        gather_across_workers: bool = True,
    ) -> None:
        super().__init__()
        self.logit_scale = LogitScale(temperature, learnable_temperature)
        self.bidirectional = bidirectional
        self.gather_across_workers = gather_across_workers

    logit_inputs = ("logit_scale",)

    @classmethod
    def logit_parameters(cls, config: VEmbedConfig) -> LogitParameters | None:
        return learnable_temperature_parameters(config)

    @classmethod
    def from_config(cls, config: VEmbedConfig) -> InfoNCELoss:
        return cls(
            temperature=config.temperature,
            learnable_temperature=config.learnable_temperature,
            bidirectional=config.bidirectional,
            gather_across_workers=config.gather_across_workers,
        )

    def compute(self, inputs: LossInputs) -> Tensor:
        check_class_labels(inputs.labels, "infonce")
        scale = inputs.scale(self.logit_scale)
        gather = self.gather_across_workers
        forward = collect_candidates(inputs.positive, inputs.negatives, inputs.labels, anchor_dim=2, gather=gather)
        logits = scale * inputs.query @ forward.embeddings.T
        loss = forward.share_of_mean(contrastive_nll(logits, forward.is_positive))
        if not self.bidirectional:
            return loss
        reverse = collect_candidates(inputs.query, None, inputs.labels, anchor_dim=2, gather=gather)
        reverse_logits = scale * inputs.positive @ reverse.embeddings.T
        return (loss + reverse.share_of_mean(contrastive_nll(reverse_logits, reverse.is_positive))) / 2
