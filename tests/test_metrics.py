"""Retrieval metrics against hand-worked examples and a brute-force reference written here.

The reference builds the full score matrix, ranks every candidate with a Python sort on
(-score, candidate index) and computes each metric with the textbook loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vembed.evaluation.metrics import LabelRelevance, metrics_per_dim, retrieval_metrics

pytestmark = pytest.mark.unit

KS = (1, 3, 10)


def reference_metrics(scores: np.ndarray, relevant: list[set[int]], ks, exclude_self: bool = False) -> dict:
    per_query: dict[str, list[float]] = {}
    skipped = 0
    for q, row in enumerate(scores):
        rel = relevant[q] - ({q} if exclude_self else set())
        if not rel:
            skipped += 1
            continue
        ranked = sorted((j for j in range(len(row)) if not (exclude_self and j == q)), key=lambda j: (-row[j], j))
        values = {}
        for k in ks:
            top = ranked[:k]
            found = [j for j in top if j in rel]
            values[f"recall@{k}"] = len(found) / len(rel)
            values[f"hit_rate@{k}"] = float(bool(found))
            values[f"precision@{k}"] = len(found) / k
            dcg = sum(1 / math.log2(pos + 2) for pos, j in enumerate(top) if j in rel)
            idcg = sum(1 / math.log2(pos + 2) for pos in range(min(len(rel), k)))
            values[f"ndcg@{k}"] = dcg / idcg
            first = next((pos + 1 for pos, j in enumerate(top) if j in rel), None)
            values[f"mrr@{k}"] = 1 / first if first else 0.0
        first = next(pos + 1 for pos, j in enumerate(ranked) if j in rel)
        values["mrr"] = 1 / first
        hits, precision_sum = 0, 0.0
        for pos, j in enumerate(ranked):
            if j in rel:
                hits += 1
                precision_sum += hits / (pos + 1)
        values["map"] = precision_sum / len(rel)
        for name, value in values.items():
            per_query.setdefault(name, []).append(value)
    out = {name: sum(v) / len(v) for name, v in per_query.items()}
    out["num_queries"] = len(scores) - skipped
    out["num_queries_without_relevant"] = skipped
    out["num_candidates"] = scores.shape[1]
    return out


def assert_metrics_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name


def test_hand_worked_two_relevant_items() -> None:
    # Scores 5, 4, 3, 2, 1; relevant candidates 1 and 3 sit at ranks 2 and 4.
    query, cands = torch.tensor([[1.0]]), torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    got = retrieval_metrics(query, cands, [[1, 3]], ks=(1, 2, 5))
    log2 = math.log2
    assert got["recall@1"] == 0 and got["hit_rate@1"] == 0 and got["mrr@1"] == 0
    assert got["recall@2"] == 0.5 and got["hit_rate@2"] == 1 and got["precision@2"] == 0.5
    assert got["recall@5"] == 1 and got["precision@5"] == pytest.approx(0.4)
    assert got["ndcg@2"] == pytest.approx((1 / log2(3)) / (1 + 1 / log2(3)))
    assert got["ndcg@5"] == pytest.approx((1 / log2(3) + 1 / log2(5)) / (1 + 1 / log2(3)))
    assert got["mrr"] == 0.5 and got["mrr@2"] == 0.5
    assert got["map"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert (got["num_queries"], got["num_queries_without_relevant"], got["num_candidates"]) == (1, 0, 5)


def test_ties_rank_lower_candidate_index_first() -> None:
    query, cands = torch.tensor([[1.0]]), torch.ones(3, 1)  # every candidate scores 1
    assert retrieval_metrics(query, cands, [[2]], ks=(1,))["mrr"] == pytest.approx(1 / 3)
    assert retrieval_metrics(query, cands, [[0]], ks=(1,))["mrr"] == 1.0
    both = retrieval_metrics(query, cands, [[0, 2]], ks=(1, 2))  # ranks 1 and 3
    assert both["map"] == pytest.approx((1 + 2 / 3) / 2)
    assert both["recall@2"] == 0.5 and both["precision@2"] == 0.5


def test_multiple_relevant_by_candidate_ids() -> None:
    # Two images, six captions, three captions per image (the i2t case); captions named by string ids.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    captions = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    ids = ["a", "b", "c", "d", "e", "f"]
    got = retrieval_metrics(images, captions, [["a", "c", "e"], ["b", "d", "f"]], cand_ids=ids, ks=(3,))
    # image 0 scores .9 .1 .8 .3 .6 .2 -> a, c, e on top; image 1 scores .1 .9 .2 .7 .4 .8 -> b, f, d on top
    assert got["recall@3"] == 1.0 and got["map"] == 1.0 and got["ndcg@3"] == pytest.approx(1.0)
    shifted = retrieval_metrics(images, captions, [["a", "c", "d"], ["b", "d", "f"]], cand_ids=ids, ks=(3,))
    assert shifted["recall@3"] == pytest.approx((2 / 3 + 1) / 2)  # d is rank 4 for image 0 (after a, c, e)
    assert shifted["map"] == pytest.approx(((1 + 1 + 3 / 4) / 3 + 1) / 2)


def test_query_without_relevant_is_counted_not_nan() -> None:
    query, cands = torch.tensor([[1.0], [1.0], [1.0]]), torch.tensor([[3.0], [2.0], [1.0]])
    got = retrieval_metrics(query, cands, [[1], [], [0]], ks=(1,))
    assert got["num_queries"] == 2 and got["num_queries_without_relevant"] == 1
    assert got["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["recall@1"] == 0.5
    assert all(not math.isnan(v) for v in got.values())


def test_no_query_with_relevant_raises() -> None:
    with pytest.raises(ValueError, match="none of the 2 queries has a relevant candidate"):
        retrieval_metrics(torch.ones(2, 1), torch.ones(3, 1), [[], []])
    with pytest.raises(ValueError, match="after excluding each query itself"):
        retrieval_metrics(torch.eye(2), torch.eye(2), query_labels=[0, 1], cand_labels=[0, 1], exclude_self=True)


def test_labels_leave_one_out_hand_worked() -> None:
    # Items 0 and 1 are identical; labels A, B, A. Query 1 (B) has no other B: it is counted as without relevant.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = retrieval_metrics(x, x, query_labels=["A", "B", "A"], cand_labels=["A", "B", "A"], exclude_self=True, ks=(1,))
    # query 0: candidates 1 (score 1), 2 (score 0) -> relevant 2 at rank 2; query 2: 0 and 1 tie -> 0 at rank 1
    assert got["num_queries"] == 2 and got["num_queries_without_relevant"] == 1
    assert got["mrr"] == pytest.approx(0.75) and got["recall@1"] == 0.5
    assert got["num_candidates"] == 3


def test_query_label_missing_from_candidates_counts_as_without_relevant() -> None:
    got = retrieval_metrics(torch.eye(2), torch.eye(2), query_labels=["x", "zzz"], cand_labels=["x", "y"])
    assert got["num_queries_without_relevant"] == 1 and got["recall@1"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_random_ids_match_brute_force(chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((19, 6)).astype(np.float32)
    cands = rng.standard_normal((31, 6)).astype(np.float32)
    relevant = [set(rng.choice(31, size=rng.integers(0, 5), replace=False).tolist()) for _ in range(19)]
    got = retrieval_metrics(queries, cands, [sorted(r) for r in relevant], ks=KS, chunk_size=chunk_size)
    assert_metrics_equal(got, reference_metrics(queries.astype(np.float64) @ cands.T.astype(np.float64), relevant, KS))


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 1000])
def test_heavy_ties_match_brute_force(chunk_size: int) -> None:
    # Small-integer embeddings: exact scores with many ties between relevant and non-relevant candidates.
    rng = np.random.default_rng(1)
    queries = rng.integers(0, 3, (11, 2)).astype(np.float32)
    cands = rng.integers(0, 3, (25, 2)).astype(np.float32)
    relevant = [set(rng.choice(25, size=rng.integers(1, 6), replace=False).tolist()) for _ in range(11)]
    got = retrieval_metrics(queries, cands, [list(r) for r in relevant], ks=KS, chunk_size=chunk_size)
    assert_metrics_equal(got, reference_metrics(queries @ cands.T, relevant, KS))


@pytest.mark.parametrize("chunk_size", [2, 5, 1000])
def test_labels_leave_one_out_match_brute_force(chunk_size: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((29, 5)).astype(np.float32)
    labels = rng.integers(0, 6, 29)
    labels[0] = 99  # a singleton class: no relevant item once the query itself is excluded
    got = retrieval_metrics(
        x, x, query_labels=labels, cand_labels=labels, exclude_self=True, ks=KS, chunk_size=chunk_size
    )
    relevant = [{j for j in range(29) if labels[j] == labels[q]} for q in range(29)]
    expected = reference_metrics(x.astype(np.float64) @ x.T.astype(np.float64), relevant, KS, exclude_self=True)
    assert expected["num_queries_without_relevant"] == 1
    assert_metrics_equal(got, expected)


def test_multi_vector_maxsim_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((7, 3, 4)).astype(np.float32)
    c = rng.standard_normal((12, 5, 4)).astype(np.float32)
    qm, cm = np.ones((7, 3), bool), np.ones((12, 5), bool)
    qm[1, 1:] = False
    cm[4, 2:] = False
    scores = np.zeros((7, 12))
    for i in range(7):
        for j in range(12):
            sim = q[i][qm[i]].astype(np.float64) @ c[j][cm[j]].T.astype(np.float64)
            scores[i, j] = sim.max(axis=1).sum()
    relevant = [{(2 * i) % 12, (2 * i + 5) % 12} for i in range(7)]
    got = retrieval_metrics(q, c, [list(r) for r in relevant], query_mask=qm, cand_mask=cm, ks=KS, chunk_size=2)
    assert_metrics_equal(got, reference_metrics(scores, relevant, KS))


def test_metrics_per_dim_truncates_and_renormalises() -> None:
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((13, 16)).astype(np.float32)
    cands = rng.standard_normal((21, 16)).astype(np.float32)
    relevant = [{q % 21, (q * 7) % 21} for q in range(13)]
    got = metrics_per_dim(queries, cands, dims=[4, 8, 16], relevant=[list(r) for r in relevant], ks=KS)
    assert list(got) == [4, 8, 16]
    for d, metrics in got.items():
        qd = queries[:, :d] / np.linalg.norm(queries[:, :d], axis=1, keepdims=True)
        cd = cands[:, :d] / np.linalg.norm(cands[:, :d], axis=1, keepdims=True)
        assert_metrics_equal(metrics, reference_metrics(qd.astype(np.float64) @ cd.T.astype(np.float64), relevant, KS))
    assert got[4] != got[16]  # truncation changes the ranking on this data


def test_index_arrays_as_relevance() -> None:
    rng = np.random.default_rng(5)
    queries, cands = rng.standard_normal((8, 4)), rng.standard_normal((8, 4))
    paired = retrieval_metrics(queries, cands, np.arange(8))
    assert paired == retrieval_metrics(queries, cands, [[i] for i in range(8)])
    two_each = np.stack([np.arange(8), (np.arange(8) + 3) % 8], axis=1)
    assert retrieval_metrics(queries, cands, torch.from_numpy(two_each)) == retrieval_metrics(
        queries, cands, two_each.tolist()
    )


def test_prebuilt_relevance_is_reused() -> None:
    x = torch.randn(6, 3)
    labels = [0, 1, 0, 1, 0, 1]
    relevance = LabelRelevance(labels, labels)
    assert retrieval_metrics(x, x, relevance, exclude_self=True) == retrieval_metrics(
        x, x, query_labels=labels, cand_labels=labels, exclude_self=True
    )


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: retrieval_metrics(torch.randn(2, 4), torch.randn(3, 8), [[0], [1]]),
            ValueError,
            "dim 4 but cand_emb has dim 8",
        ),
        (lambda: retrieval_metrics(torch.randn(0, 4), torch.randn(3, 4), []), ValueError, "query_emb is empty"),
        (lambda: retrieval_metrics(torch.randn(2, 4), torch.randn(0, 4), [[], []]), ValueError, "cand_emb is empty"),
        (
            lambda: retrieval_metrics(torch.tensor([[1.0, float("nan")]]), torch.randn(3, 2), [[0]]),
            ValueError,
            "query_emb contains NaN",
        ),
        (
            lambda: retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), [[0]]),
            ValueError,
            "relevant has 1 entries but there are 2 queries",
        ),
        (
            lambda: retrieval_metrics(torch.randn(1, 4), torch.randn(3, 4), [[3]]),
            ValueError,
            r"candidate indices in \[0, 3\)",
        ),
        (
            lambda: retrieval_metrics(torch.randn(1, 4), torch.randn(3, 4), [["q"]], cand_ids=["a", "b", "c"]),
            ValueError,
            "'q', which is not in cand_ids",
        ),
        (
            lambda: retrieval_metrics(torch.randn(1, 4), torch.randn(3, 4), [[0]], cand_ids=["a", "a", "c"]),
            ValueError,
            "duplicate ids",
        ),
        (lambda: retrieval_metrics(torch.randn(1, 4), torch.randn(3, 4)), ValueError, "give relevance exactly one way"),
        (
            lambda: retrieval_metrics(
                torch.randn(1, 4), torch.randn(3, 4), [[0]], query_labels=[0], cand_labels=[0, 1, 2]
            ),
            ValueError,
            "give relevance exactly one way",
        ),
        (
            lambda: retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), query_labels=[0, 1], cand_labels=[0, 1]),
            ValueError,
            "2 candidate labels for 3 candidates",
        ),
        (
            lambda: retrieval_metrics(torch.randn(1, 4), torch.randn(3, 4), [[0]], ks=(0, 5)),
            ValueError,
            "ks must be a non-empty list of positive ints",
        ),
        (
            lambda: retrieval_metrics(torch.randn(1, 2, 4), torch.randn(3, 4), [[0]]),
            ValueError,
            "query_emb is 3-D and cand_emb is 2-D",
        ),
        (
            lambda: retrieval_metrics(torch.randn(1, 4), torch.randn(3, 4), [[0]], query_mask=torch.ones(1, 1)),
            ValueError,
            "only to multi-vector",
        ),
        (
            lambda: metrics_per_dim(torch.randn(1, 4), torch.randn(3, 4), dims=[2, 8], relevant=[[0]]),
            ValueError,
            r"dims must be .* in \[1, 4\]",
        ),
        (
            lambda: metrics_per_dim(torch.randn(1, 4), torch.randn(3, 8), dims=[2], relevant=[[0]]),
            ValueError,
            "dim 4 but cand_emb has dim 8",
        ),
    ],
)
def test_bad_input_raises_clear_errors(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()
