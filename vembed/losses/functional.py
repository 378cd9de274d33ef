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


def maxsim_scores(query: Tensor, query_mask: Tensor, docs: Tensor, doc_mask: Tensor) -> Tensor:
    """ColBERT late interaction: ``score[b, c] = sum_i max_j <query[b, i], docs[c, j]>`` over valid tokens.

    ``query`` ``[B, Lq, D]`` with ``query_mask`` ``[B, Lq]``, ``docs`` ``[C, Ld, D]`` with ``doc_mask``
    ``[C, Ld]`` (True/1 = real token). Padding document tokens never win the max; padding query
    tokens add nothing. Returns ``[B, C]``.
    """
    token_sims = torch.einsum("bqd,cjd->bcqj", query, docs)
    token_sims = token_sims.masked_fill(~doc_mask.bool()[None, :, None, :], float("-inf"))
    best = token_sims.max(dim=-1).values  # [B, C, Lq]
    return best.masked_fill(~query_mask.bool()[:, None, :], 0.0).sum(dim=-1)
