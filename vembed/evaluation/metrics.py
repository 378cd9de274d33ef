"""Retrieval metrics from exact ranks: Recall@K, HitRate@K, Precision@K, NDCG@K, MRR(@K), mAP.

Every metric here is a function of the ranks of each query's relevant candidates, so this module computes
those ranks exactly and derives all metrics from them (:func:`metrics_from_ranks`). A relevant item's
rank is 1 + the number of other candidates ordered before it: higher score first, ties by lower
candidate index (the order of :func:`vembed.evaluation.search.search_topk`). Ranks are counted block by
block, so mAP and MRR are exact over the full ranking while memory stays bounded, whatever the corpus size.

Definitions (per query with R relevant candidates and relevant ranks r_1 < ... < r_R; binary relevance):

- ``recall@K``    = |{i : r_i <= K}| / R : the fraction of the relevant items found in the top K.
- ``hit_rate@K``  = 1 if r_1 <= K else 0. With one relevant item per query this equals recall@K; it is
  what single-positive retrieval papers (e.g. CLIP's image-text Recall@K) call "Recall@K".
- ``precision@K`` = |{i : r_i <= K}| / K (K, not the corpus size, even when K exceeds it).
- ``ndcg@K``      = sum_{r_i <= K} 1/log2(r_i + 1) / sum_{j=1}^{min(R, K)} 1/log2(j + 1).
- ``mrr``         = 1 / r_1;  ``mrr@K`` = 1 / r_1 if r_1 <= K else 0.
- ``map``         = mean over queries of AP = (1/R) * sum_i i / r_i (exact: all relevant ranks are known).

Queries without any relevant candidate have no defined value for these metrics. They are left out of the
averages and counted in ``num_queries_without_relevant``; ``num_queries`` counts the queries averaged.
That keeps a single unlabeled query from turning the scores into NaN or silently pulling them to zero.
If no query has a relevant candidate at all, :func:`retrieval_metrics` raises ValueError.

Leave-one-out (``exclude_self=True``, queries are the candidates, e.g. image-to-image by class label):
candidate i is removed from query i's ranking and from its relevant set.

Float note: relevant items are scored pair by pair and the rest in blocks; the two routes agree up to
float rounding, so two different candidates whose scores differ only by rounding may be ordered either way.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vembed.evaluation.search import ArrayLike, DotScorer, MaxSimScorer, Scorer, as_embeddings, iter_blocks

# Candidate ids / labels may be any hashable (int, str); relevance lists hold such ids.
Id = Hashable


class ListRelevance:
    """Relevance from explicit lists: ``relevant[q]`` names query q's relevant candidates.

    Entries are candidate indices, or ids looked up in ``cand_ids`` when given. Duplicates collapse (relevance
    is a set); an empty list is allowed (the query is then counted as having no relevant candidate). An array
    ``[Q, R]`` gives R relevant candidates per query; a 1-D array ``[Q]`` gives one (paired data).
    """

    def __init__(
        self, relevant: Sequence[Iterable[Id]] | ArrayLike, num_candidates: int, cand_ids: Sequence[Id] | None = None
    ):
        if isinstance(relevant, (Tensor, np.ndarray)):  # [Q, R] array, or [Q]: one relevant candidate per query
            relevant = relevant.tolist() if relevant.ndim != 1 else [[x] for x in relevant.tolist()]
        if isinstance(relevant, (str, bytes)) or not isinstance(relevant, Sequence):
            raise ValueError(
                f"relevant must be a list with one list of relevant candidates per query, got {relevant!r:.80}"
            )
        lookup: dict[Id, int] | None = None
        if cand_ids is not None:
            if len(cand_ids) != num_candidates:
                raise ValueError(f"cand_ids has {len(cand_ids)} ids but there are {num_candidates} candidates")
            lookup = {cid: i for i, cid in enumerate(cand_ids)}
            if len(lookup) != num_candidates:
                raise ValueError("cand_ids contains duplicate ids; each candidate needs a unique id")
        ptr, idx = [0], []
        for q, items in enumerate(relevant):
            if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
                raise ValueError(
                    f"relevant[{q}] must be a list of candidate {'ids' if lookup else 'indices'}, got {items!r}"
                )
            found = {self._resolve(item, q, lookup, num_candidates) for item in items}
            idx.extend(sorted(found))
            ptr.append(len(idx))
        self.num_queries, self.num_candidates = len(relevant), num_candidates
        self._ptr = torch.tensor(ptr, dtype=torch.long)
        self._idx = torch.tensor(idx, dtype=torch.long)

    @staticmethod
    def _resolve(item: Id, q: int, lookup: dict[Id, int] | None, num_candidates: int) -> int:
        if lookup is not None:
            if item not in lookup:
                raise ValueError(f"relevant[{q}] names candidate id {item!r}, which is not in cand_ids")
            return lookup[item]
        if (
            isinstance(item, (bool, np.bool_))
            or not isinstance(item, (int, np.integer))
            or not 0 <= item < num_candidates
        ):
            raise ValueError(
                f"relevant[{q}] holds {item!r}; without cand_ids, entries must be candidate indices in "
                f"[0, {num_candidates}) (pass cand_ids= to use ids)"
            )
        return int(item)

    def block(self, q0: int, q1: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
        """CSR ``(ptr [q+1], idx)`` of queries ``q0:q1``: global candidate indices, ascending per query."""
        ptr = self._ptr[q0 : q1 + 1] - self._ptr[q0]
        idx = self._idx[int(self._ptr[q0]) : int(self._ptr[q1])]
        return _drop_self(ptr, idx, q0) if exclude_self else (ptr, idx)


class LabelRelevance:
    """Relevance from class labels: candidate j is relevant to query q iff their labels are equal.

    The relevant sets are built per query block from candidates grouped by label, so large classes never
    materialise a queries x class-size table. A query label absent from the candidates has no relevant item.
    """

    def __init__(self, query_labels: Sequence[Id] | ArrayLike, cand_labels: Sequence[Id] | ArrayLike):
        query_labels, cand_labels = _label_list(query_labels, "query_labels"), _label_list(cand_labels, "cand_labels")
        codes: dict[Id, int] = {}
        cand_codes = torch.tensor([codes.setdefault(label, len(codes)) for label in cand_labels], dtype=torch.long)
        self._query_codes = torch.tensor([codes.get(label, -1) for label in query_labels], dtype=torch.long)
        self._cand_order = torch.argsort(cand_codes, stable=True)  # grouped by label, index-ascending inside
        self._class_size = torch.bincount(cand_codes, minlength=len(codes))
        self._class_start = torch.cumsum(self._class_size, 0) - self._class_size
        self.num_queries, self.num_candidates = len(query_labels), len(cand_labels)

    def block(self, q0: int, q1: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
        """CSR ``(ptr [q+1], idx)`` of queries ``q0:q1``: global candidate indices, ascending per query."""
        codes = self._query_codes[q0:q1]
        known = codes >= 0
        counts = torch.where(known, self._class_size[codes.clamp(min=0)], 0)
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        rows = torch.repeat_interleave(torch.arange(q1 - q0), counts)
        offsets = torch.arange(int(ptr[-1])) - ptr[rows]
        idx = self._cand_order[self._class_start[codes[rows]] + offsets]
        return _drop_self(ptr, idx, q0) if exclude_self else (ptr, idx)


Relevance = ListRelevance | LabelRelevance


def _drop_self(ptr: Tensor, idx: Tensor, q0: int) -> tuple[Tensor, Tensor]:
    """Remove candidate i from query i's relevant set (leave-one-out)."""
    rows = torch.repeat_interleave(torch.arange(len(ptr) - 1), ptr.diff())
    keep = idx != rows + q0
    counts = torch.bincount(rows[keep], minlength=len(ptr) - 1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), idx[keep]


def _label_list(labels: Sequence[Id] | ArrayLike, name: str) -> list[Id]:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional (one label per item), got shape {labels.shape}")
        return labels.tolist()
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"{name} must be a list with one label per item, got the string {labels!r:.80}")
    return list(labels)


def relevant_ranks(
    scorer: Scorer, relevance: Relevance, chunk_size: int, exclude_self: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """Exact 1-based ranks of every relevant candidate, one query block at a time.

    Yields ``(ranks [q, Rmax] int64, num_relevant [q])`` per block of ``chunk_size`` queries: each row
    ascending and padded past ``num_relevant`` with ``num_candidates + 1``. Relevant scores are sorted per
    query; every other candidate's score is bucketed against them with ``searchsorted``, and a suffix sum
    gives, for each relevant item, how many non-relevant candidates rank before it. A score equal to a
    relevant score counts as before it only for a lower candidate index.
    """
    nq, nc, device = scorer.num_queries, scorer.num_candidates, scorer.device
    for q0 in range(0, nq, chunk_size):
        q1 = min(q0 + chunk_size, nq)
        ptr, idx = relevance.block(q0, q1, exclude_self)
        counts = ptr.diff()
        width = max(int(counts.max()), 1)
        rows = torch.repeat_interleave(torch.arange(q1 - q0), counts)
        slot = torch.arange(len(idx)) - ptr[rows]
        # Per row: relevant scores ascending, equal scores with the higher index first, then +inf padding and
        # one +inf sentinel column, so that searchsorted below never points past the last column.
        rel_s = torch.full((q1 - q0, width + 1), float("inf"), device=device)
        rel_i = torch.full((q1 - q0, width + 1), nc, dtype=torch.long, device=device)
        rows_d, slot_d, idx_d = rows.to(device), slot.to(device), idx.to(device)
        rel_s[rows_d, slot_d] = scorer.pairs(rows_d + q0, idx_d)
        rel_i[rows_d, slot_d] = idx_d
        rel_i, order = rel_i.sort(dim=1, descending=True)
        rel_s, order = rel_s.gather(1, order).sort(dim=1, stable=True)
        rel_i = rel_i.gather(1, order)

        # Each candidate block finds its own relevant pairs by bisection in its (ascending) candidate indices.
        pair_rows, pair_cands = rows_d, idx_d
        bucket = torch.zeros(q1 - q0, width + 1, dtype=torch.long, device=device)  # b: above the b lowest relevant
        tie_ahead = torch.zeros(q1 - q0, width + 1, dtype=torch.long, device=device)
        for cols, scores in iter_blocks(scorer, q0, q1, chunk_size, exclude_self):
            at = torch.searchsorted(cols, pair_cands).clamp(max=len(cols) - 1)  # the pairs whose candidate is here
            here = cols[at] == pair_cands
            scores[pair_rows[here], at[here]] = float("-inf")  # relevant items are ranked apart
            below = torch.searchsorted(rel_s, scores)  # how many relevant scores are strictly lower
            bucket.scatter_add_(1, below, torch.ones((), dtype=torch.long, device=device).expand_as(below))
            _count_ties(scores, below, rel_s, rel_i, cols, tie_ahead)
        nonrel_ahead = bucket.flip(1).cumsum(1).flip(1)[:, 1:] + tie_ahead[:, :width]
        rel_ahead = counts.to(device)[:, None] - 1 - torch.arange(width, device=device)
        ranks = 1 + rel_ahead + nonrel_ahead
        ranks = torch.where(torch.arange(width, device=device) < counts.to(device)[:, None], ranks, nc + 1)
        yield ranks.sort(dim=1).values.cpu(), counts


def _count_ties(scores: Tensor, below: Tensor, rel_s: Tensor, rel_i: Tensor, cols: Tensor, tie_ahead: Tensor) -> None:
    """For block entries equal to relevant scores, add one to each such relevant item with a higher index
    (``cols``: the block's candidate indices)."""
    row, col = (rel_s.gather(1, below) == scores).nonzero(as_tuple=True)
    slot = below[row, col]
    one = torch.ones((), dtype=tie_ahead.dtype, device=tie_ahead.device)
    while len(row):  # walk each run of equal relevant scores (almost always of length 1); +inf sentinel ends it
        equal = rel_s[row, slot] == scores[row, col]
        row, col, slot = row[equal], col[equal], slot[equal]
        ahead = cols[col] < rel_i[row, slot]
        tie_ahead.index_put_((row[ahead], slot[ahead]), one, accumulate=True)
        slot = slot + 1


def metrics_from_ranks(ranks: Tensor, num_relevant: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Per-query metrics ``{name: [Q] float64}`` from ascending relevant ranks (see the module docstring).

    ``ranks`` is ``[Q, Rmax]``, row q valid in its first ``num_relevant[q]`` entries. Queries with no
    relevant item get 0 everywhere; callers leave them out of averages.
    """
    width = ranks.shape[1]
    valid = torch.arange(width) < num_relevant[:, None]
    r = torch.where(valid, ranks, 1).double()
    n = num_relevant.double().clamp(min=1)
    out: dict[str, Tensor] = {}
    first = r[:, 0]
    has = num_relevant > 0
    max_k = max(ks)
    ideal = torch.cumsum(1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64)), 0)
    gain = torch.where(valid, 1.0 / torch.log2(r + 1), 0.0)
    for k in ks:
        in_top = valid & (r <= k)
        hits = in_top.sum(1).double()
        out[f"recall@{k}"] = hits / n
        out[f"hit_rate@{k}"] = (hits > 0).double()
        out[f"precision@{k}"] = hits / k
        idcg = ideal[(num_relevant.clamp(max=k) - 1).clamp(min=0)]
        out[f"ndcg@{k}"] = torch.where(has, (gain * in_top).sum(1) / idcg, 0.0)
        out[f"mrr@{k}"] = torch.where(has & (first <= k), 1.0 / first, 0.0)
    out["mrr"] = torch.where(has, 1.0 / first, 0.0)
    precision_at_hits = torch.arange(1, width + 1, dtype=torch.float64) / r
    out["map"] = torch.where(valid, precision_at_hits, 0.0).sum(1) / n
    return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive ints, e.g. (1, 5, 10), got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def _make_scorer(
    queries: Tensor,
    cands: Tensor,
    query_mask: ArrayLike | None,
    cand_mask: ArrayLike | None,
    normalize: bool,
    exclude_self: bool,
) -> Scorer:
    if normalize:
        queries, cands = F.normalize(queries, dim=-1), F.normalize(cands, dim=-1)
    if queries.ndim == 3:
        return MaxSimScorer(queries, query_mask, cands, cand_mask, exclude_self)
    if query_mask is not None or cand_mask is not None:
        raise ValueError("query_mask / cand_mask apply only to multi-vector [n, tokens, dim] embeddings")
    return DotScorer(queries, cands, exclude_self)


def _build_relevance(relevant, cand_ids, query_labels, cand_labels, num_queries: int, num_candidates: int) -> Relevance:
    if isinstance(relevant, (ListRelevance, LabelRelevance)) and cand_ids is None and query_labels is None:
        if (relevant.num_queries, relevant.num_candidates) != (num_queries, num_candidates):
            raise ValueError(
                f"the relevance was built for {relevant.num_queries} queries x {relevant.num_candidates} candidates, "
                f"but the embeddings are {num_queries} x {num_candidates}"
            )
        return relevant
    by_lists, by_labels = relevant is not None, query_labels is not None or cand_labels is not None
    if by_lists == by_labels:
        raise ValueError(
            "give relevance exactly one way: relevant= (a list of relevant candidates per query) "
            "or query_labels= and cand_labels= (relevant iff same label)"
        )
    if by_lists:
        relevance = ListRelevance(relevant, num_candidates, cand_ids)
        if relevance.num_queries != num_queries:
            raise ValueError(
                f"relevant has {relevance.num_queries} entries but there are {num_queries} queries; "
                f"give one list of relevant candidates per query (an empty list when none)"
            )
        return relevance
    if query_labels is None or cand_labels is None:
        raise ValueError("label relevance needs both query_labels= and cand_labels=")
    relevance = LabelRelevance(query_labels, cand_labels)
    if (relevance.num_queries, relevance.num_candidates) != (num_queries, num_candidates):
        raise ValueError(
            f"need one label per query and per candidate: got {relevance.num_queries} query labels for "
            f"{num_queries} queries and {relevance.num_candidates} candidate labels for {num_candidates} candidates"
        )
    return relevance


def _average(
    scorer: Scorer, relevance: Relevance, ks: tuple[int, ...], chunk_size: int, exclude_self: bool
) -> dict[str, float]:
    """Mean of each metric over the queries that have at least one relevant candidate, plus counts."""
    sums: dict[str, float] = {}
    with_relevant = 0
    for ranks, num_relevant in relevant_ranks(scorer, relevance, chunk_size, exclude_self):
        has = num_relevant > 0
        with_relevant += int(has.sum())
        for name, values in metrics_from_ranks(ranks, num_relevant, ks).items():
            sums[name] = sums.get(name, 0.0) + float(values[has].sum())
    if not with_relevant:
        raise ValueError(
            f"none of the {scorer.num_queries} queries has a relevant candidate"
            f"{' (after excluding each query itself)' if exclude_self else ''}; check the relevance ids or labels"
        )
    result: dict[str, float] = {name: total / with_relevant for name, total in sums.items()}
    result["num_queries"] = with_relevant
    result["num_queries_without_relevant"] = scorer.num_queries - with_relevant
    result["num_candidates"] = scorer.num_candidates
    return result


def retrieval_metrics(
    query_emb: ArrayLike,
    cand_emb: ArrayLike,
    relevant: Sequence[Iterable[Id]] | ArrayLike | Relevance | None = None,
    *,
    cand_ids: Sequence[Id] | None = None,
    query_labels: Sequence[Id] | ArrayLike | None = None,
    cand_labels: Sequence[Id] | ArrayLike | None = None,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    normalize: bool = False,
    query_mask: ArrayLike | None = None,
    cand_mask: ArrayLike | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Exact retrieval metrics of ``query_emb`` against ``cand_emb``, averaged over queries.

    Embeddings are ``[n, dim]`` (scored by inner product) or ``[n, tokens, dim]`` with optional padding
    masks (scored by MaxSim). Relevance is either ``relevant`` -- one list per query of relevant candidate
    indices, or of ids when ``cand_ids`` names each candidate; an index array ``[Q, R]`` or ``[Q]`` (one
    relevant per query, paired data); or a prebuilt :class:`ListRelevance` / :class:`LabelRelevance` --
    or ``query_labels``/``cand_labels`` (relevant iff same label).
    ``exclude_self`` ranks query i without candidate i (leave-one-out I2I). ``normalize`` L2-normalises
    embeddings first (cosine similarity). ``chunk_size`` bounds memory (default 4096 single-vector,
    64 multi-vector).

    Returns a flat dict: ``recall@K``, ``hit_rate@K``, ``precision@K``, ``ndcg@K``, ``mrr@K`` per K in
    ``ks``, ``mrr``, ``map`` (all in [0, 1]), and the counts ``num_queries``,
    ``num_queries_without_relevant``, ``num_candidates``. See the module docstring for definitions.
    """
    ks = _check_ks(ks)
    queries = as_embeddings(query_emb, "query_emb", ndim=(2, 3))
    cands = as_embeddings(cand_emb, "cand_emb", ndim=(2, 3))
    _check_same_dim(queries, cands)
    scorer = _make_scorer(queries, cands, query_mask, cand_mask, normalize, exclude_self)
    relevance = _build_relevance(relevant, cand_ids, query_labels, cand_labels, len(queries), len(cands))
    return _average(scorer, relevance, ks, _default_chunk(scorer, chunk_size), exclude_self)


def metrics_per_dim(
    query_emb: ArrayLike,
    cand_emb: ArrayLike,
    dims: Sequence[int],
    relevant: Sequence[Iterable[Id]] | ArrayLike | Relevance | None = None,
    *,
    cand_ids: Sequence[Id] | None = None,
    query_labels: Sequence[Id] | ArrayLike | None = None,
    cand_labels: Sequence[Id] | ArrayLike | None = None,
    **kwargs: Any,
) -> dict[int, dict[str, float]]:
    """Matryoshka evaluation: :func:`retrieval_metrics` on the first ``d`` dims, re-normalised, for each ``d``.

    A prefix of a unit vector is not a unit vector, so every truncation is L2-normalised before scoring.
    Relevance is parsed once and shared by all dims; other keyword arguments (``ks``, ``exclude_self``,
    masks, ``chunk_size``) are those of :func:`retrieval_metrics`. Returns ``{dim: metrics}`` in the
    order of ``dims``.
    """
    if "normalize" in kwargs:
        raise TypeError("metrics_per_dim always re-normalises the truncated embeddings; drop normalize=")
    queries = as_embeddings(query_emb, "query_emb", ndim=(2, 3))
    cands = as_embeddings(cand_emb, "cand_emb", ndim=(2, 3))
    _check_same_dim(queries, cands)
    full = queries.shape[-1]
    dims = list(dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= full for d in dims):
        raise ValueError(f"dims must be a non-empty list of ints in [1, {full}] (the embedding dim), got {dims!r}")
    relevance = _build_relevance(relevant, cand_ids, query_labels, cand_labels, len(queries), len(cands))
    return {
        int(d): retrieval_metrics(queries[..., :d], cands[..., :d], relevance, normalize=True, **kwargs) for d in dims
    }


def _check_same_dim(queries: Tensor, cands: Tensor) -> None:
    if queries.ndim != cands.ndim:
        raise ValueError(
            f"query_emb is {queries.ndim}-D and cand_emb is {cands.ndim}-D; use [n, dim] on both sides "
            f"(single-vector) or [n, tokens, dim] on both sides (multi-vector MaxSim)"
        )
    if queries.shape[-1] != cands.shape[-1]:
        raise ValueError(
            f"query_emb has dim {queries.shape[-1]} but cand_emb has dim {cands.shape[-1]}; both sides must "
            f"come from the same model (and the same Matryoshka dim)"
        )


def _default_chunk(scorer: Scorer, chunk_size: int | None) -> int:
    if chunk_size is None:
        return 64 if isinstance(scorer, MaxSimScorer) else 4096
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size
