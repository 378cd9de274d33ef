"""Exact brute-force retrieval in bounded memory: top-k search and multi-vector MaxSim.

Scores are inner products of the embeddings as given (normalise them first for cosine similarity);
multi-vector items are scored by late interaction (ColBERT MaxSim): for every valid query token, the
best inner product with any valid candidate token, summed over query tokens.

Memory stays bounded because scores are only ever built for one block of queries times one block of
candidates (``chunk_size`` x ``chunk_size`` items); a running top-k per query is merged across candidate
blocks, so neither the full ``[Q, N]`` score matrix nor a ``[chunk, N]`` strip exists, whatever N is.

Multi-vector search is padding-aware: candidates are visited in order of length (their last real token), so
each block holds items of about one length and is scored cut to its own longest item, and each query block to
its longest query; no item is padded to the corpus-wide maximum. A scorer's ``scan_order`` is that visiting
order; :func:`iter_blocks` hands every block on with its columns' candidate indices (ascending), so top-k, score
matrices and rank counting see the same scores and tie rule as an unsorted scan.

Ties: candidates are ordered by score, descending, then by candidate index, ascending. The order is
therefore deterministic and identical for every ``chunk_size``. ``torch.topk`` gives no order among equal
values, so each block's selection is re-sorted by (score, index), and rows where equal scores straddle
the k-th place are recomputed with a stable sort.

Computation runs in float32 on the device of ``queries`` (candidate blocks are moved there one at a
time); results are returned on that device.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from vembed.maxsim import maxsim, maxsim_paired

ArrayLike = Tensor | np.ndarray

# Elements (pairs x per-pair work) scored per step in ``Scorer.pairs``; bounds its temporary memory.
_PAIR_BUDGET = 1 << 22


def as_embeddings(x: ArrayLike, name: str, ndim: int | tuple[int, ...] = 2) -> Tensor:
    """Return ``x`` as a float32 tensor after checking its rank, emptiness and finiteness.

    ``name`` is used in the error message so the caller knows which argument is wrong.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in ndims:
        shapes = " or ".join({2: "[n, dim]", 3: "[n, tokens, dim]"}[d] for d in ndims)
        raise ValueError(f"{name} must have shape {shapes}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one item with a non-zero dim")
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.detach().to(torch.float32)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_rows = (~finite).reshape(len(x), -1).any(1).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN or infinite values in {len(bad_rows)} row(s), first rows "
            f"{bad_rows[:5].tolist()}; check the encoder output (e.g. fp16 overflow) before evaluating"
        )
    return x


def _as_token_mask(mask: ArrayLike | None, emb: Tensor, name: str) -> Tensor:
    """Validate a ``[n, tokens]`` padding mask (True = real token); None means every token is real."""
    if mask is None:
        return torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(emb.shape[:2]):
        raise ValueError(
            f"{name} must have shape {tuple(emb.shape[:2])} to match its embeddings, got {tuple(mask.shape)}"
        )
    mask = mask.to(device=emb.device, dtype=torch.bool)
    empty = (~mask.any(1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{name} marks no valid token in row(s) {empty[:5].tolist()}; every item needs >= 1 token")
    return mask


def _check_pair(queries: Tensor, candidates: Tensor, exclude_self: bool) -> None:
    if queries.shape[-1] != candidates.shape[-1]:
        raise ValueError(
            f"query embeddings have dim {queries.shape[-1]} but candidate embeddings have dim "
            f"{candidates.shape[-1]}; both sides must come from the same model (and Matryoshka dim)"
        )
    if exclude_self and len(queries) != len(candidates):
        raise ValueError(
            f"exclude_self=True needs queries and candidates to be the same items (query i is candidate i), "
            f"got {len(queries)} queries and {len(candidates)} candidates"
        )


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


class DotScorer:
    """Inner-product scores between single-vector queries ``[Q, D]`` and candidates ``[N, D]``."""

    #: candidates are scanned in index order
    scan_order: Tensor | None = None

    def __init__(self, queries: ArrayLike, candidates: ArrayLike, exclude_self: bool = False) -> None:
        self.queries = as_embeddings(queries, "queries")
        self.candidates = as_embeddings(candidates, "candidates")
        _check_pair(self.queries, self.candidates, exclude_self)
        self.device = self.queries.device

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    def block(self, q0: int, q1: int, c0: int, c1: int) -> Tensor:
        """Scores ``[q1 - q0, c1 - c0]`` of queries ``q0:q1`` against candidates ``c0:c1``."""
        return self.queries[q0:q1] @ self.candidates[c0:c1].to(self.device).T

    def pairs(self, query_idx: Tensor, cand_idx: Tensor) -> Tensor:
        """Scores ``[P]`` of the given (query, candidate) index pairs, without any full block."""
        out = torch.empty(len(query_idx), device=self.device)
        step = max(1, _PAIR_BUDGET // self.queries.shape[1])
        for s in range(0, len(query_idx), step):
            qv = self.queries.index_select(0, query_idx[s : s + step])
            cv = self.candidates.index_select(0, cand_idx[s : s + step].to(self.candidates.device)).to(self.device)
            out[s : s + step] = torch.einsum("pd,pd->p", qv, cv)
        return out


class MaxSimScorer:
    """Late-interaction scores (:mod:`vembed.maxsim`) of blocks and pairs, for the chunked searches below.

    ``queries`` is ``[Q, Lq, D]``, ``candidates`` is ``[N, Lc, D]``; masks are ``[Q, Lq]`` / ``[N, Lc]`` with
    True for real tokens (None: all real). A block of ``q`` queries and ``c`` candidates holds
    ``q * Lq * c * Lc`` floats, so keep ``chunk_size`` small (the default 64 with Lq=32, Lc=256 is 128 MiB).

    Candidates are scanned by length (``scan_order``: a stable sort of their last real token), and every block
    is cut to the longest item it holds, so an item costs about its own length, not the corpus-wide padded one.
    """

    def __init__(
        self,
        queries: ArrayLike,
        query_mask: ArrayLike | None,
        candidates: ArrayLike,
        cand_mask: ArrayLike | None,
        exclude_self: bool = False,
    ) -> None:
        self.queries = as_embeddings(queries, "queries", ndim=3)
        self.candidates = as_embeddings(candidates, "candidates", ndim=3)
        _check_pair(self.queries, self.candidates, exclude_self)
        self.query_mask = _as_token_mask(query_mask, self.queries, "query_mask")
        self.cand_mask = _as_token_mask(cand_mask, self.candidates, "cand_mask")
        self.device = self.queries.device
        self.query_len = _lengths(self.query_mask)
        self.cand_len = _lengths(self.cand_mask)
        self.scan_order = torch.sort(self.cand_len, stable=True).indices

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    def block(self, q0: int, q1: int, c0: int, c1: int) -> Tensor:
        """MaxSim scores ``[q1 - q0, c1 - c0]`` of queries ``q0:q1`` against the candidates at positions ``c0:c1``
        of ``scan_order`` (columns in that order), each side cut to its longest item."""
        idx = self.scan_order[c0:c1]
        lc = int(self.cand_len[idx].max())
        c, cm = self.candidates[idx, :lc].to(self.device), self.cand_mask[idx, :lc].to(self.device)
        lq = int(self.query_len[q0:q1].max())
        return maxsim(self.queries[q0:q1, :lq], self.query_mask[q0:q1, :lq], c, cm)

    def pairs(self, query_idx: Tensor, cand_idx: Tensor) -> Tensor:
        """MaxSim scores ``[P]`` of the given (query, candidate) index pairs."""
        out = torch.empty(len(query_idx), device=self.device)
        step = max(1, _PAIR_BUDGET // (self.queries.shape[1] * self.candidates.shape[1]))
        for s in range(0, len(query_idx), step):
            qi, ci = query_idx[s : s + step], cand_idx[s : s + step].to(self.candidates.device)
            lq, lc = int(self.query_len[qi].max()), int(self.cand_len[ci].max())
            cands, cand_mask = self.candidates[ci, :lc].to(self.device), self.cand_mask[ci, :lc].to(self.device)
            out[s : s + step] = maxsim_paired(self.queries[qi, :lq], self.query_mask[qi, :lq], cands, cand_mask)
        return out


def _lengths(mask: Tensor) -> Tensor:
    """Per row of a ``[n, tokens]`` mask, one past its last real token (rows without one are refused earlier)."""
    return mask.shape[1] - mask.flip(1).int().argmax(dim=1)


Scorer = DotScorer | MaxSimScorer


def iter_blocks(
    scorer: Scorer, q0: int, q1: int, chunk_size: int, exclude_self: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(cols, scores)`` for the candidate blocks of queries ``q0:q1``, in the scorer's ``scan_order``.

    ``cols`` are the candidate indices of the block's columns, ascending (consecutive when the scorer scans in
    index order); every candidate is in exactly one block. With ``exclude_self`` the score of candidate i for
    query i is -inf, so it never ranks.
    """
    order = scorer.scan_order
    for c0 in range(0, scorer.num_candidates, chunk_size):
        c1 = min(c0 + chunk_size, scorer.num_candidates)
        scores = scorer.block(q0, q1, c0, c1)
        if order is None:
            cols = torch.arange(c0, c1, device=scores.device)
        else:
            cols, by_index = order[c0:c1].to(scores.device).sort()
            scores = scores[:, by_index]
        if exclude_self:
            row, col = (cols[None, :] == torch.arange(q0, q1, device=scores.device)[:, None]).nonzero(as_tuple=True)
            scores[row, col] = float("-inf")
        yield cols, scores


def _order_by_score_then_index(scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score descending, ties by index ascending (two stable passes)."""
    indices, by_index = indices.sort(dim=1)
    scores = scores.gather(1, by_index)
    scores, by_score = scores.sort(dim=1, descending=True, stable=True)
    return scores, indices.gather(1, by_score)


def _block_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``min(k, c)`` of each row of a ``[q, c]`` block, ordered by (score desc, index asc)."""
    width = scores.shape[1]
    if width <= k:
        values, idx = scores.sort(dim=1, descending=True, stable=True)
        return values, idx
    values, idx = scores.topk(k + 1, dim=1)  # one extra to detect ties straddling the k-th place
    straddle = (values[:, k] == values[:, k - 1]).nonzero().flatten()
    values, idx = _order_by_score_then_index(values[:, :k], idx[:, :k])
    if len(straddle):  # rare: equal scores cross the cut, so topk's choice among them is arbitrary
        exact_values, exact_idx = scores[straddle].sort(dim=1, descending=True, stable=True)
        values[straddle], idx[straddle] = exact_values[:, :k], exact_idx[:, :k]
    return values, idx


def chunked_topk(scorer: Scorer, k: int, chunk_size: int, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """Exact top-k for any scorer: a running top-k per query block, merged over candidate blocks."""
    _check_chunk_size(chunk_size)
    available = scorer.num_candidates - int(exclude_self)
    if not isinstance(k, int) or not 1 <= k <= available:
        raise ValueError(
            f"k must be an int in [1, {available}] (the number of candidates"
            f"{' minus the excluded self' if exclude_self else ''}), got {k!r}"
        )
    out_scores = torch.empty(scorer.num_queries, k, device=scorer.device)
    out_idx = torch.empty(scorer.num_queries, k, dtype=torch.long, device=scorer.device)
    for q0 in range(0, scorer.num_queries, chunk_size):
        q1 = min(q0 + chunk_size, scorer.num_queries)
        best_s = torch.empty(q1 - q0, 0, device=scorer.device)
        best_i = torch.empty(q1 - q0, 0, dtype=torch.long, device=scorer.device)
        for cols, scores in iter_blocks(scorer, q0, q1, chunk_size, exclude_self):
            block_s, block_i = _block_topk(scores, k)  # columns ascend by candidate index: index order on ties
            merged_s, merged_i = _order_by_score_then_index(
                torch.cat([best_s, block_s], 1), torch.cat([best_i, cols[block_i]], 1)
            )
            best_s, best_i = merged_s[:, :k], merged_i[:, :k]
        out_scores[q0:q1], out_idx[q0:q1] = best_s, best_i
    return out_scores, out_idx


def search_topk(
    queries: ArrayLike, candidates: ArrayLike, k: int, chunk_size: int = 4096, exclude_self: bool = False
) -> tuple[Tensor, Tensor]:
    """Exact top-k inner-product search of ``queries [Q, D]`` over ``candidates [N, D]``.

    Returns ``(scores [Q, k], indices [Q, k])``, best first, ties broken by lower candidate index.
    Peak extra memory is one ``chunk_size x chunk_size`` float32 block (64 MiB at the default 4096).
    ``exclude_self`` drops candidate i from query i's results (leave-one-out when queries are the
    candidates, e.g. image-to-image retrieval); it needs Q == N and then k <= N - 1.
    """
    return chunked_topk(DotScorer(queries, candidates, exclude_self), k, chunk_size, exclude_self)


def maxsim_scores(
    queries: ArrayLike,
    query_mask: ArrayLike | None,
    candidates: ArrayLike,
    cand_mask: ArrayLike | None,
    chunk_size: int = 64,
) -> Tensor:
    """Late-interaction (MaxSim) score matrix ``[Q, N]`` of ``queries [Q, Lq, D]`` vs ``candidates [N, Lc, D]``.

    Masks are ``[Q, Lq]`` / ``[N, Lc]`` booleans, True for real tokens, None when nothing is padded.
    Padded candidate tokens never win the max; padded query tokens add nothing to the sum.
    """
    _check_chunk_size(chunk_size)
    scorer = MaxSimScorer(queries, query_mask, candidates, cand_mask)
    out = torch.empty(scorer.num_queries, scorer.num_candidates, device=scorer.device)
    for q0 in range(0, scorer.num_queries, chunk_size):
        q1 = min(q0 + chunk_size, scorer.num_queries)
        for cols, scores in iter_blocks(scorer, q0, q1, chunk_size, exclude_self=False):
            out[q0:q1, cols] = scores
    return out


def maxsim_topk(
    queries: ArrayLike,
    query_mask: ArrayLike | None,
    candidates: ArrayLike,
    cand_mask: ArrayLike | None,
    k: int,
    chunk_size: int = 64,
    exclude_self: bool = False,
) -> tuple[Tensor, Tensor]:
    """Exact top-k late-interaction search; same contract as :func:`search_topk` with MaxSim scores."""
    scorer = MaxSimScorer(queries, query_mask, candidates, cand_mask, exclude_self)
    return chunked_topk(scorer, k, chunk_size, exclude_self)
