"""Small pieces of loss maths shared by several losses (pure functions, no state)."""

from __future__ import annotations

import torch
from torch import Tensor


def contrastive_nll(logits: Tensor, is_positive: Tensor) -> Tensor:
    """Per-row ``-mean_{j positive} log softmax(logits)_j``: ``[B, C]`` logits and mask -> ``[B]``.

    With exactly one positive per row this is the cross-entropy of InfoNCE; with several it is the
    supervised-contrastive loss (Khosla et al. 2020, "L_out"): every positive stays in the
    denominator and the row's loss averages the log-likelihood of its positives.
    """
    log_prob = torch.log_softmax(logits, dim=-1).masked_fill(~is_positive, 0.0)
    return -log_prob.sum(dim=-1) / is_positive.sum(dim=-1).clamp(min=1)
