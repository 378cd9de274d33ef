"""The candidate set a rank's queries are scored against, gathered across ranks when asked.

Candidates are every positive of the (global) batch followed by every explicit negative. Shared
negatives ``[K, ...]`` and per-query negatives ``[B, K, ...]`` are both flattened into the pool, so
every query also sees the other queries' hard negatives (standard practice: more negatives for free;
a hard negative of one query is almost never a positive of another). Hard negatives are never
positives, whatever the labels. ``is_positive[b, c]`` marks the positives of local query ``b``:
its own paired candidate, or with labels every in-batch candidate of the same label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vembed.losses.distributed import Gathered, all_gather_with_grad


@dataclass(frozen=True)
class Candidates:
    """Candidates for ``B`` local anchors (queries, or positives in a reverse term)."""

    embeddings: Tensor  # [C, D] or [C, L, D]: the paired rows of all ranks, then all negatives
    token_mask: Tensor | None  # [C, L] bool for multi-vector candidates, else None
    is_positive: Tensor  # [B, C] bool
    own_positive: Tensor  # [B] long: column of each anchor's paired candidate
    paired: Gathered  # the gathered paired rows (offset, total, world size)

    def share_of_mean(self, per_anchor: Tensor) -> Tensor:
        """This rank's share of the mean over all ranks' anchors (see ``Gathered.share_of_mean``)."""
        return self.paired.share_of_mean(per_anchor)


def _gather(t: Tensor, enabled: bool) -> Gathered:
    return all_gather_with_grad(t) if enabled else Gathered(t, offset=0, total=t.shape[0], world_size=1)


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    """Zero-pad dim 1 (tokens) of ``[N, L, ...]`` to ``length``."""
    pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad) if length > t.shape[1] else t


def collect_candidates(
    paired: Tensor,
    negatives: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    anchor_dim: int,
    paired_mask: Tensor | None = None,
    negative_mask: Tensor | None = None,
    gather: bool = False,
) -> Candidates:
    """Build the candidate pool for ``B`` anchors whose ``b``-th paired candidate is ``paired[b]``.

    ``anchor_dim`` is the number of dims of one batch of anchors (2 single-vector, 3 multi-vector):
    negatives with one more dim are per-anchor and get flattened. With ``gather`` the paired rows,
    negatives, labels and masks of every rank are concatenated (gradient-preserving).
    """
    batch = paired.shape[0]
    multi_vector = anchor_dim == 3
    if multi_vector and paired_mask is None:  # explicit masks so that cross-rank padding stays masked
        paired_mask = torch.ones(paired.shape[:-1], dtype=torch.bool, device=paired.device)
    if negatives is not None and negatives.dim() == anchor_dim + 1:
        negatives = negatives.flatten(0, 1)
        negative_mask = None if negative_mask is None else negative_mask.flatten(0, 1)
    if multi_vector and negatives is not None and negative_mask is None:
        negative_mask = torch.ones(negatives.shape[:-1], dtype=torch.bool, device=negatives.device)

    paired_g = _gather(paired, gather)
    parts = [paired_g.tensor]
    masks = [_gather(paired_mask.bool(), gather).tensor] if multi_vector else []
    if negatives is not None:
        parts.append(_gather(negatives, gather).tensor)
        if multi_vector:
            masks.append(_gather(negative_mask.bool(), gather).tensor)
    if multi_vector:
        length = max(p.shape[1] for p in parts)
        parts = [_pad_tokens(p, length) for p in parts]
        masks = [_pad_tokens(m, length) for m in masks]
    embeddings = torch.cat(parts, dim=0)
    token_mask = torch.cat(masks, dim=0) if multi_vector else None

    own = paired_g.offset + torch.arange(batch, device=paired.device)
    is_positive = torch.zeros(batch, embeddings.shape[0], dtype=torch.bool, device=paired.device)
    if labels is None:
        is_positive[torch.arange(batch, device=paired.device), own] = True
    else:
        all_labels = _gather(labels, gather).tensor
        is_positive[:, : paired_g.total] = labels[:, None] == all_labels[None, :]
    return Candidates(embeddings, token_mask, is_positive, own, paired_g)
