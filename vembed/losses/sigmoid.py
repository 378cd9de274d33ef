"""SigLIP sigmoid loss: every (query, candidate) pair is an independent binary classification.

``logit = scale * s(q, c) + bias``; the target is +1 for the query's positive(s) and -1 for every
other candidate (in-batch positives of other queries and all hard negatives)::

    l_b = -sum_c log sigmoid(z_bc * logit_bc),   loss = mean_b l_b

(Zhai et al. 2023: the sum over candidates is divided by the batch size). Scale and bias are
learnable (scale stored as its log, like the paper's ``t'``). The pairwise loss is symmetric, so
there is no separate reverse term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vembed.config import VEmbedConfig
from vembed.losses.base import EmbeddingLoss, LossInputs, check_class_labels
from vembed.losses.candidates import collect_candidates
from vembed.losses.registry import register_loss
from vembed.losses.scale import LogitParameters, LogitScale


def _check_init_scale(init_scale: float) -> None:
    if not init_scale > 0:
        raise ValueError(f"sigmoid_init_scale must be > 0, got {init_scale}")


@register_loss("sigmoid")
class SigmoidLoss(EmbeddingLoss):
    """SigLIP pairwise sigmoid loss with learnable logit scale and bias."""

    logit_inputs = ("logit_scale", "logit_bias")

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, gather_across_workers: bool = True) -> None:
        super().__init__()
        _check_init_scale(init_scale)
        self.logit_scale = LogitScale(1.0 / init_scale, learnable=True)
        self.logit_bias = nn.Parameter(torch.tensor([float(init_bias)]))  # [1]: FSDP2 refuses 0-dim params
        self.gather_across_workers = gather_across_workers

    @classmethod
    def logit_parameters(cls, config: VEmbedConfig) -> LogitParameters:
        _check_init_scale(config.sigmoid_init_scale)
        return LogitParameters(1.0 / config.sigmoid_init_scale, bias=config.sigmoid_init_bias)

    @classmethod
    def from_config(cls, config: VEmbedConfig) -> SigmoidLoss:
        return cls(
            init_scale=config.sigmoid_init_scale,
            init_bias=config.sigmoid_init_bias,
            gather_across_workers=config.gather_across_workers,
        )

    def compute(self, inputs: LossInputs) -> Tensor:
        check_class_labels(inputs.labels, "sigmoid")
        cands = collect_candidates(
            inputs.positive, inputs.negatives, inputs.labels, anchor_dim=2, gather=self.gather_across_workers
        )
        logits = inputs.scale(self.logit_scale) * inputs.query @ cands.embeddings.T + inputs.bias(self.logit_bias)
        signs = cands.is_positive.to(logits.dtype) * 2 - 1
        return cands.share_of_mean(-F.logsigmoid(signs * logits).sum(dim=-1))
