"""MaxSim (ColBERT late interaction), written once for the loss, evaluation, ``similarity``, batch output and Serve.

``score(q, d) = sum_{i real in q} max_{j real in d} <q_i, d_j>``: for every real query token, its best inner product
with any real document token, summed over the query tokens (Khattab & Zaharia 2020). Padding document tokens never
win the max and padding query tokens add nothing, so a padded item scores exactly as the same item unpadded.

This module is pure numerics (torch and numpy, nothing else of vembed), so every floor may import it:

* :func:`maxsim` -- all pairs: ``[B, Lq, D]`` queries x ``[C, Ld, D]`` documents -> ``[B, C]`` (the loss, search).
* :func:`maxsim_paired` -- row ``i`` against row ``i`` -> ``[P]`` (evaluation's rank counting).
* :func:`maxsim_arrays` -- ragged numpy: one ``[Lq, D]`` query and documents ``[L_i, D]`` -> ``[N]`` (the
  Predictor's ``similarity``, Serve).
* :func:`pad_vectors` -- ragged ``[L_i, D]`` items -> padded ``[N, L, D]`` + mask, the layout the two above take.

All of them reduce token similarities with :func:`_reduce`, the one place where the masking, max and sum happen.
Gradients flow (the loss trains through :func:`maxsim`); without gradients the masks are applied in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _fill(x: Tensor, where: Tensor, value: float) -> Tensor:
    """``x`` with ``where`` set to ``value``; in place unless autograd needs ``x`` unchanged."""
    return x.masked_fill(where, value) if x.requires_grad else x.masked_fill_(where, value)


def _reduce(sim: Tensor, doc_pad: Tensor, query_pad: Tensor, query_axis: int) -> Tensor:
    """MaxSim from token similarities ``sim`` (document tokens last): max over real document tokens, then the sum
    over real query tokens (axis ``query_axis`` of the max). ``doc_pad`` / ``query_pad`` are True at padding and
    broadcast against ``sim`` / the max."""
    best = _fill(sim, doc_pad, float("-inf")).amax(dim=-1)
    return _fill(best, query_pad, 0.0).sum(dim=query_axis)


def _mask(mask: Tensor | None, emb: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
    return mask.to(device=emb.device, dtype=torch.bool)


def maxsim(query: Tensor, query_mask: Tensor | None, docs: Tensor, doc_mask: Tensor | None) -> Tensor:
    """All-pairs MaxSim: ``query [B, Lq, D]`` (mask ``[B, Lq]``) x ``docs [C, Ld, D]`` (mask ``[C, Ld]``) -> ``[B, C]``.

    Masks are True/1 for real tokens; None means every token is real. One matmul computes every token pair, so
    callers bound ``B * Lq * C * Ld`` themselves (evaluation scores blocks of a few dozen items).
    """
    qm, dm = _mask(query_mask, query), _mask(doc_mask, docs)
    b, lq, d = query.shape
    c, ld = docs.shape[:2]
    sim = (query.reshape(-1, d) @ docs.reshape(-1, d).T).view(b, lq, c, ld)
    return _reduce(sim, ~dm[None, None], ~qm[:, :, None], query_axis=1)


def maxsim_paired(query: Tensor, query_mask: Tensor | None, docs: Tensor, doc_mask: Tensor | None) -> Tensor:
    """MaxSim of row ``i`` of ``query [P, Lq, D]`` against row ``i`` of ``docs [P, Ld, D]`` -> ``[P]``."""
    qm, dm = _mask(query_mask, query), _mask(doc_mask, docs)
    sim = query @ docs.transpose(1, 2)  # [P, Lq, Ld]
    return _reduce(sim, ~dm[:, None], ~qm, query_axis=1)


def pad_vectors(items: Sequence[np.ndarray | Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Ragged multi-vector items ``[L_i, D]`` -> ``(padded [N, L, D] float32, mask [N, L] bool)``.

    ``L`` is the longest item, or ``length`` when given (it must fit every item). Padding rows are zero.

    Raises:
        ValueError: no items, an item that is not ``[L_i, D]`` with ``L_i >= 1``, or items of different widths.
    """
    if len(items) == 0:
        raise ValueError("pad_vectors needs at least one item")
    tensors = [torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32) for x in items]
    bad = [i for i, t in enumerate(tensors) if t.dim() != 2 or t.shape[0] < 1]
    if bad:
        shape = tuple(tensors[bad[0]].shape)
        raise ValueError(f"item {bad[0]} has shape {shape}; every multi-vector item must be [vectors >= 1, dim]")
    widths = {t.shape[1] for t in tensors}
    if len(widths) > 1:
        raise ValueError(f"multi-vector items have different widths {sorted(widths)}; they must share one dim")
    longest = max(t.shape[0] for t in tensors)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest item ({longest} vectors)")
    padded = torch.zeros(len(tensors), length, widths.pop())
    mask = torch.zeros(len(tensors), length, dtype=torch.bool)
    for i, t in enumerate(tensors):
        padded[i, : len(t)] = t
        mask[i, : len(t)] = True
    return padded, mask


def maxsim_arrays(query: np.ndarray, docs: Sequence[np.ndarray]) -> np.ndarray:
    """MaxSim of one multi-vector query ``[Lq, D]`` against each ragged document ``[L_i, D]`` -> ``[N]`` float32."""
    q, qm = pad_vectors([query])
    d, dm = pad_vectors(docs)
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(f"the query has dim {q.shape[-1]} but the documents have dim {d.shape[-1]}")
    with torch.no_grad():
        return maxsim(q, qm, d, dm)[0].numpy().astype(np.float32)
