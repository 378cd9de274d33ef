"""Exact chunked search and MaxSim against full-matrix references built here with plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vembed.evaluation.search import maxsim_scores, maxsim_topk, search_topk

pytestmark = pytest.mark.unit


def reference_topk(scores: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k from a full score matrix: sort each row by (-score, index) in Python."""
    out_s, out_i = [], []
    for q, row in enumerate(scores):
        order = sorted((j for j in range(len(row)) if not (exclude_self and j == q)), key=lambda j: (-row[j], j))[:k]
        out_i.append(order)
        out_s.append([row[j] for j in order])
    return np.array(out_s, dtype=np.float32), np.array(out_i)


def reference_maxsim(q, qm, c, cm) -> np.ndarray:
    """MaxSim with explicit loops over items and tokens."""
    out = np.zeros((len(q), len(c)), dtype=np.float64)
    for i in range(len(q)):
        for j in range(len(c)):
            total = 0.0
            for t in range(q.shape[1]):
                if qm[i, t]:
                    total += max(float(q[i, t] @ c[j, s]) for s in range(c.shape[1]) if cm[j, s])
            out[i, j] = total
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1000])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_search_topk_matches_full_matrix(chunk_size: int, exclude_self: bool) -> None:
    rng = np.random.default_rng(0)
    n = 23
    queries = rng.standard_normal((n, 8)).astype(np.float32)
    cands = queries if exclude_self else rng.standard_normal((n, 8)).astype(np.float32)
    k = 6
    scores, idx = search_topk(queries, cands, k, chunk_size=chunk_size, exclude_self=exclude_self)
    ref_s, ref_i = reference_topk(queries @ cands.T, k, exclude_self)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 5, 100])
def test_ties_go_to_lower_index_across_and_inside_chunks(chunk_size: int) -> None:
    # Scores are exact small integers; several ties straddle the k-th place and chunk borders.
    cands = torch.tensor([[1.0], [3.0], [2.0], [3.0], [1.0], [3.0], [2.0], [3.0], [0.0]])
    queries = torch.tensor([[1.0], [-1.0]])
    scores, idx = search_topk(queries, cands, k=5, chunk_size=chunk_size)
    assert idx.tolist() == [[1, 3, 5, 7, 2], [8, 0, 4, 2, 6]]
    assert scores.tolist() == [[3, 3, 3, 3, 2], [0, -1, -1, -2, -2]]


@pytest.mark.parametrize("chunk_size", [37, 64, 1000])
def test_many_ties_in_large_blocks_match_reference(chunk_size: int) -> None:
    # Small-integer embeddings give exact, heavily tied scores; torch.topk alone picks arbitrary tied items.
    rng = np.random.default_rng(4)
    queries = rng.integers(0, 2, (6, 3)).astype(np.float32)
    cands = rng.integers(0, 2, (300, 3)).astype(np.float32)
    scores, idx = search_topk(queries, cands, k=10, chunk_size=chunk_size)
    ref_s, ref_i = reference_topk(queries @ cands.T, 10)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_array_equal(scores.numpy(), ref_s)


def test_all_equal_candidates_return_first_indices() -> None:
    scores, idx = search_topk(torch.ones(3, 4), torch.ones(50, 4), k=7, chunk_size=6)
    assert idx.tolist() == [list(range(7))] * 3


def test_exclude_self_allows_k_up_to_n_minus_one() -> None:
    x = torch.eye(4)
    _, idx = search_topk(x, x, k=3, exclude_self=True, chunk_size=2)
    assert all(q not in row for q, row in enumerate(idx.tolist()))
    assert [sorted(row) for row in idx.tolist()] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_maxsim_scores_match_loops_with_padding() -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((5, 4, 6)).astype(np.float32)
    c = rng.standard_normal((7, 3, 6)).astype(np.float32)
    qm = np.ones((5, 4), dtype=bool)
    qm[1, 2:] = False
    qm[4, 1:] = False
    cm = np.ones((7, 3), dtype=bool)
    cm[0, 1:] = False
    cm[6, 2] = False
    # Padded tokens carry large values: a correct mask keeps them out of both the max and the sum.
    q[~qm] = 50.0
    c[~cm] = 50.0
    expected = reference_maxsim(q, qm, c, cm)
    for chunk_size in (1, 2, 64):
        got = maxsim_scores(q, qm, c, cm, chunk_size=chunk_size)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-4)


def test_maxsim_without_masks_uses_every_token() -> None:
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 2, 5)).astype(np.float32)
    c = rng.standard_normal((4, 3, 5)).astype(np.float32)
    expected = reference_maxsim(q, np.ones((3, 2), bool), c, np.ones((4, 3), bool))
    np.testing.assert_allclose(maxsim_scores(q, None, c, None).numpy(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_maxsim_topk_matches_full_matrix(exclude_self: bool) -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((9, 3, 4)).astype(np.float32)
    c = q if exclude_self else rng.standard_normal((9, 2, 4)).astype(np.float32)
    qm = np.ones(q.shape[:2], dtype=bool)
    qm[2, 1:] = False
    cm = qm if exclude_self else np.ones(c.shape[:2], dtype=bool)
    full = reference_maxsim(q, qm, c, cm)
    scores, idx = maxsim_topk(q, qm, c, cm, k=4, chunk_size=2, exclude_self=exclude_self)
    ref_s, ref_i = reference_topk(full, 4, exclude_self)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("queries", "cands", "kwargs", "message"),
    [
        (torch.randn(3, 4), torch.randn(5, 6), {"k": 1}, "dim 4 but candidate embeddings have dim 6"),
        (torch.randn(0, 4), torch.randn(5, 4), {"k": 1}, "queries is empty"),
        (torch.randn(3, 4), torch.randn(5, 4), {"k": 6}, r"k must be an int in \[1, 5\]"),
        (torch.randn(3, 4), torch.randn(5, 4), {"k": 0}, r"k must be an int in \[1, 5\]"),
        (torch.randn(5, 4), torch.randn(5, 4), {"k": 5, "exclude_self": True}, r"\[1, 4\].*minus the excluded self"),
        (torch.randn(3, 4), torch.randn(5, 4), {"k": 1, "exclude_self": True}, "same items"),
        (torch.randn(3, 4), torch.randn(5, 4), {"k": 1, "chunk_size": 0}, "chunk_size must be a positive int"),
        (torch.randn(3), torch.randn(5, 4), {"k": 1}, r"queries must have shape \[n, dim\]"),
        (torch.tensor([[0.0, float("nan")]]), torch.randn(5, 2), {"k": 1}, r"queries contains NaN.*rows \[0\]"),
    ],
)
def test_search_rejects_bad_input(queries, cands, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        search_topk(queries, cands, **kwargs)


def test_maxsim_rejects_bad_masks() -> None:
    q, c = torch.randn(2, 3, 4), torch.randn(2, 2, 4)
    with pytest.raises(ValueError, match=r"query_mask must have shape \(2, 3\)"):
        maxsim_scores(q, torch.ones(2, 2, dtype=torch.bool), c, None)
    with pytest.raises(ValueError, match=r"cand_mask marks no valid token in row\(s\) \[1\]"):
        maxsim_scores(q, None, c, torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match=r"\[n, tokens, dim\]"):
        maxsim_scores(torch.randn(2, 4), None, c, None)


def _ragged_corpus(rng, n: int, longest: int, dim: int, gaps: bool) -> tuple[np.ndarray, np.ndarray]:
    """``n`` items of 1..``longest`` tokens padded to ``longest`` (padding holds large values a wrong mask would
    pick), optionally with masked-out tokens inside items (as a ColQwen content mask leaves)."""
    x = rng.standard_normal((n, longest, dim)).astype(np.float32)
    mask = np.arange(longest)[None, :] < rng.integers(1, longest + 1, size=n)[:, None]
    if gaps:
        holes = rng.random(mask.shape) < 0.2
        holes[:, 0] = False
        mask &= ~holes
    x[~mask] = 50.0
    return x, mask


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_padding_aware_maxsim_search_equals_the_loop_reference(chunk_size: int, exclude_self: bool) -> None:
    rng = np.random.default_rng(7)
    q, qm = _ragged_corpus(rng, 11, 6, 5, gaps=True)
    c, cm = (q, qm) if exclude_self else _ragged_corpus(rng, 17, 12, 5, gaps=True)
    full = reference_maxsim(q, qm, c, cm)
    np.testing.assert_allclose(maxsim_scores(q, qm, c, cm, chunk_size=chunk_size).numpy(), full, atol=1e-4)
    k = 5
    scores, idx = maxsim_topk(q, qm, c, cm, k=k, chunk_size=chunk_size, exclude_self=exclude_self)
    ref_s, ref_i = reference_topk(full, k, exclude_self)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 2, 64])
def test_maxsim_ties_between_items_of_different_lengths_go_to_the_lower_index(chunk_size: int) -> None:
    from vembed.evaluation.metrics import retrieval_metrics

    # Candidate 0 holds the vector v twice, candidate 2 once: equal MaxSim, but a length-sorted scan meets 2 first.
    v, w = [1.0, 0.0], [0.0, 1.0]
    cands = torch.tensor([[v, v, v], [w, [0.0, 0.0], [0.0, 0.0]], [v, [0.0, 0.0], [0.0, 0.0]]])
    cand_mask = torch.tensor([[True, True, True], [True, False, False], [True, False, False]])
    query = torch.tensor([[v]])
    scores, idx = maxsim_topk(query, None, cands, cand_mask, k=2, chunk_size=chunk_size)
    assert idx.tolist() == [[0, 2]] and scores.tolist() == [[1.0, 1.0]]
    ranks = {}
    for relevant in (0, 2):
        ranks[relevant] = retrieval_metrics(
            query, cands, [[relevant]], query_mask=None, cand_mask=cand_mask, ks=(1,), chunk_size=chunk_size
        )["mrr"]
    assert ranks == {0: 1.0, 2: 0.5}  # the tie ranks the lower index first, whichever is relevant
