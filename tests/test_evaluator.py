"""Evaluators: every retrieval mode against a brute-force reference built in the test from the raw records, the
Predictor and explicit ranking loops; Matryoshka dims, in-memory models, file formats, and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vembed.data.readers import EmptyDatasetError
from vembed.data.records import RecordError
from vembed.evaluation.evalset import load_eval_set
from vembed.evaluation.evaluator import evaluate_model_path, evaluate_predictor, score_eval_set
from vembed.inference import VEmbedFactoryPredictor
from vembed.model import EmbeddingModel
from vembed.testing import make_shapes_dataset

pytestmark = pytest.mark.unit

KS = (1, 2, 5)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def predictor(tiny_clip_dir) -> VEmbedFactoryPredictor:
    torch.manual_seed(0)
    return VEmbedFactoryPredictor(tiny_clip_dir)


# ---- an independent reference ---------------------------------------------------------------------------------


def reference_metrics(
    scores: np.ndarray, relevant: list[set[int]], ks=KS, exclude_self: bool = False
) -> tuple[dict[str, float], int]:
    """Metric means over queries with a relevant candidate, from a full sort per query (ties: lower index first)."""
    per_query = []
    for q, rel in enumerate(relevant):
        order = [
            j for j in sorted(range(scores.shape[1]), key=lambda j: (-scores[q, j], j)) if not (exclude_self and j == q)
        ]
        rel = {j for j in rel if not (exclude_self and j == q)}
        if not rel:
            continue
        ranks = sorted(order.index(j) + 1 for j in rel)
        m = {}
        for k in ks:
            hits = [r for r in ranks if r <= k]
            m[f"recall@{k}"] = len(hits) / len(ranks)
            m[f"hit_rate@{k}"] = float(bool(hits))
            m[f"precision@{k}"] = len(hits) / k
            ideal = sum(1 / math.log2(i + 2) for i in range(min(len(ranks), k)))
            m[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) for r in hits) / ideal
            m[f"mrr@{k}"] = 1 / ranks[0] if ranks[0] <= k else 0.0
        m["mrr"] = 1 / ranks[0]
        m["map"] = sum((i + 1) / r for i, r in enumerate(ranks)) / len(ranks)
        per_query.append(m)
    return {name: sum(m[name] for m in per_query) / len(per_query) for name in per_query[0]}, len(per_query)


def assert_matches(result: dict, reference: dict, num_queries: int, num_candidates: int, without: int = 0) -> None:
    for name, value in reference.items():
        assert result[name] == pytest.approx(value, abs=1e-9), name
    assert result["num_queries"] == num_queries
    assert result["num_candidates"] == num_candidates
    assert result["num_queries_without_relevant"] == without
    assert all(not math.isnan(v) for v in result.values())


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def solid_images(folder: Path, colours: dict[str, tuple[int, int, int]]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rgb in colours.items():
        img = Image.new("RGB", (32, 32), rgb)
        img.paste((255 - rgb[0], rgb[1], 255 - rgb[2]), (4, 4, 4 + 3 * len(paths) + 4, 20))  # distinct patterns
        paths[name] = str(folder / f"{name}.png")
        img.save(paths[name])
    return paths


# ---- a hand-built eval file -----------------------------------------------------------------------------------


def test_hand_built_t2i_file_matches_a_direct_computation(predictor, tmp_path):
    images = solid_images(
        tmp_path / "img", {"a": (200, 20, 20), "b": (20, 20, 200), "c": (20, 180, 20), "d": (90, 0, 0)}
    )
    records = [
        {"id": "r1", "query": "a red circle", "positive": images["a"], "negatives": [images["c"]]},
        {"id": "r2", "query": "a blue square", "positive": images["b"]},
        {"id": "r3", "query": "a red circle", "positive": images["d"]},  # same query: one query, two relevant
        {"id": "r4", "query": "green", "positive": images["c"], "negatives": [images["b"], images["a"]]},
    ]
    data = write_jsonl(tmp_path / "eval.jsonl", records)

    result = evaluate_predictor(predictor, data, mode="t2i", ks=KS, batch_size=2)

    queries = predictor.encode_text(["a red circle", "a blue square", "green"])
    pool = [images["a"], images["c"], images["b"], images["d"]]  # first appearance order
    scores = queries @ predictor.encode_image(pool).T
    reference, n = reference_metrics(scores, [{0, 3}, {2}, {1}])
    assert n == 3
    assert_matches(result, reference, num_queries=3, num_candidates=4)
    assert result["num_records"] == 4


def test_the_same_records_in_csv_and_parquet_give_the_same_metrics(predictor, shapes_t2i):
    jsonl = evaluate_predictor(predictor, shapes_t2i["test.jsonl"])
    for fmt in ("csv", "parquet"):
        assert evaluate_predictor(predictor, shapes_t2i[f"test.{fmt}"]) == pytest.approx(jsonl)


# ---- every mode -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mode_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    return {
        mode: make_shapes_dataset(root / mode, num_train=0, num_val=0, num_test=14, mode=mode, num_negatives=2)["test"]
        for mode in ("t2i", "i2t", "i2i", "t2t", "m2i", "m2t")
    }


def _encode(predictor, items: list[str], kind: str) -> np.ndarray:
    return predictor.encode_text(items) if kind == "text" else predictor.encode_image(items)


@pytest.mark.parametrize(
    "mode, query_kind, cand_kind",
    [
        ("t2i", "text", "image"),
        ("i2t", "image", "text"),
        ("t2t", "text", "text"),
        ("i2i", "image", "image"),
        ("m2i", "both", "image"),
        ("m2t", "both", "text"),
    ],
)
def test_every_mode_by_ids_matches_the_reference(predictor, mode_data, mode, query_kind, cand_kind):
    raw = [json.loads(line) for line in Path(mode_data[mode]).read_text().splitlines()]
    keys, relevant_items, pool = [], [], []
    for rec in raw:
        key = (rec["query"], rec.get("query_image"))
        if key not in keys:
            keys.append(key)
            relevant_items.append(set())
        relevant_items[keys.index(key)].add(rec["positive"])
        for item in [rec["positive"], *rec["negatives"]]:
            if item not in pool:
                pool.append(item)
    if query_kind == "both":
        queries = predictor.encode_multimodal([t for t, _ in keys], [i for _, i in keys])
    else:
        queries = _encode(predictor, [t for t, _ in keys], query_kind)
    scores = queries @ _encode(predictor, pool, cand_kind).T
    reference, n = reference_metrics(scores, [{pool.index(p) for p in items} for items in relevant_items])

    result = evaluate_predictor(predictor, mode_data[mode], mode=mode, ks=KS, relevance="ids", batch_size=5)
    assert_matches(result, reference, num_queries=n, num_candidates=len(pool))


def test_i2i_with_labels_is_leave_one_out_by_class(predictor, mode_data):
    raw = [json.loads(line) for line in Path(mode_data["i2i"]).read_text().splitlines()]
    items, labels = [], []
    for rec in raw:
        for image in (rec["query"], rec["positive"]):
            if image not in items:
                items.append(image)
                labels.append(rec["label"])
    emb = predictor.encode_image(items)
    relevant = [{j for j, other in enumerate(labels) if other == label} for label in labels]
    reference, n = reference_metrics(emb @ emb.T, relevant, exclude_self=True)

    result = evaluate_predictor(predictor, mode_data["i2i"], mode="i2i", ks=KS)  # auto: every record has a label
    singletons = sum(labels.count(label) == 1 for label in labels)
    assert_matches(result, reference, num_queries=n, num_candidates=len(items), without=singletons)
    assert n + singletons == len(items)


# ---- Matryoshka, in-memory models -----------------------------------------------------------------------------


def test_matryoshka_dims_in_one_pass_equal_a_predictor_truncating_to_each_dim(predictor, tiny_clip_dir, shapes_t2i):
    per_dim = evaluate_predictor(predictor, shapes_t2i["test"], mrl_dims=(8, 16, 32))
    assert list(per_dim) == [8, 16, 32]
    for dim in (8, 16):
        truncating = VEmbedFactoryPredictor(tiny_clip_dir, dimension=dim)
        assert per_dim[dim] == pytest.approx(evaluate_predictor(truncating, shapes_t2i["test"]), abs=1e-9)
    assert per_dim[32] == pytest.approx(evaluate_predictor(predictor, shapes_t2i["test"]), abs=1e-9)


def test_a_multi_vector_model_is_scored_by_maxsim_over_its_token_and_patch_vectors(
    tiny_clip_dir, shapes_t2i, predictor
):
    model = EmbeddingModel.from_pretrained(tiny_clip_dir, pooling_method="none").eval()
    multi_vector = VEmbedFactoryPredictor.from_model(model, predictor.preprocessor)
    result = evaluate_predictor(multi_vector, shapes_t2i["test"], ks=(1, 3))
    # reference: MaxSim and ranks with loops over the arrays the Predictor returns
    evalset = load_eval_set(shapes_t2i["test"])
    queries, cands = multi_vector.encode_text(evalset.query_texts), multi_vector.encode_image(evalset.candidates)
    assert all(c.shape == cands[0].shape for c in cands) and cands[0].shape[0] > 1  # every patch is a vector
    ranks = []
    for q, positives in zip(queries, evalset.positives, strict=True):
        scores = [sum(max(float(np.dot(t, v)) for v in c) for t in q) for c in cands]
        pos = evalset.candidates.index(positives[0])
        ranks.append(1 + sum(s > scores[pos] for i, s in enumerate(scores) if i != pos))
    assert result["recall@1"] == pytest.approx(np.mean([r == 1 for r in ranks]))
    assert result["recall@3"] == pytest.approx(np.mean([r <= 3 for r in ranks]))
    assert result["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]))


def test_an_in_memory_model_scores_as_its_saved_copy(tiny_clip_dir, shapes_t2i, predictor):
    model = EmbeddingModel.from_pretrained(tiny_clip_dir).eval()
    in_memory = VEmbedFactoryPredictor.from_model(model, predictor.preprocessor)
    loaded = evaluate_model_path(tiny_clip_dir, shapes_t2i["test"])
    assert evaluate_predictor(in_memory, shapes_t2i["test"]) == pytest.approx(loaded, abs=1e-9)


# ---- a candidate pool from elsewhere --------------------------------------------------------------------------


def test_positives_missing_from_the_pool_are_reported_not_averaged(shapes_t2i):
    evalset = load_eval_set(shapes_t2i["test"])
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(evalset.num_queries, 8)).astype(np.float32)
    pool = evalset.candidates[2:] + ["/elsewhere/distractor.jpg"]  # the first two positives are gone
    cands = rng.normal(size=(len(pool), 8)).astype(np.float32)

    result = score_eval_set(evalset, queries, cands, ks=KS, pool=pool)

    relevant = [{pool.index(p) for p in items if p in pool} for items in evalset.positives]
    reference, n = reference_metrics(queries @ cands.T, relevant)
    assert_matches(result, reference, num_queries=n, num_candidates=len(pool), without=evalset.num_queries - n)
    assert result["num_positives_missing"] == 2 and n == evalset.num_queries - 2


def test_a_pool_holding_none_of_the_positives_is_a_clear_error(shapes_t2i):
    evalset = load_eval_set(shapes_t2i["test"])
    with pytest.raises(ValueError, match="none of the 16 queries .* positive among the 2 candidates"):
        score_eval_set(evalset, np.ones((16, 4), np.float32), np.ones((2, 4), np.float32), pool=["x.jpg", "y.jpg"])


# ---- bad input ------------------------------------------------------------------------------------------------


def test_an_empty_eval_file_is_a_clear_error(predictor, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(EmptyDatasetError, match="empty.jsonl: the eval file is empty"):
        evaluate_predictor(predictor, tmp_path / "empty.jsonl")


def test_an_empty_query_names_its_line(predictor, tmp_path, shapes_t2i):
    image = str(next(shapes_t2i["images"].iterdir()))
    data = write_jsonl(
        tmp_path / "bad.jsonl", [{"query": "a cat", "positive": image}, {"query": " ", "positive": image}]
    )
    with pytest.raises(RecordError, match=r"bad.jsonl:line 2: field 'query' is empty"):
        evaluate_predictor(predictor, data)


def test_matryoshka_dims_beyond_the_model_size_fail_before_embedding(predictor, tmp_path):
    missing = write_jsonl(tmp_path / "eval.jsonl", [{"query": "a cat", "positive": "/no/such/image.jpg"}])
    with pytest.raises(ValueError, match=r"dims \[16, 64\] must be distinct integers in 1..32"):
        evaluate_predictor(predictor, missing, mrl_dims=(16, 64))


def test_query_and_candidate_embeddings_of_different_dims_are_refused(shapes_t2i):
    evalset = load_eval_set(shapes_t2i["test"])
    queries = np.ones((evalset.num_queries, 16), np.float32)
    with pytest.raises(ValueError, match="query embeddings have dim 16 but candidate embeddings have dim 32"):
        score_eval_set(evalset, queries, np.ones((len(evalset.candidates), 32), np.float32))
    with pytest.raises(ValueError, match=r"candidate embeddings must be \[16, dim\]"):
        score_eval_set(evalset, queries, np.ones((3, 16), np.float32))


def test_labels_only_for_i2i_and_one_label_per_image(tmp_path, shapes_t2i):
    with pytest.raises(ValueError, match="relevance='labels' .* needs .* mode 'i2i'"):
        load_eval_set(shapes_t2i["test"], mode="t2i", relevance="labels")
    a, b = (str(p) for p in sorted(shapes_t2i["images"].iterdir())[:2])
    data = write_jsonl(
        tmp_path / "i2i.jsonl",
        [{"query": a, "positive": b, "label": 1}, {"query": b, "positive": a, "label": 2}],
    )
    with pytest.raises(RecordError, match=r"i2i.jsonl:line 2: image .* has label 2 here but label 1 at .*line 1"):
        load_eval_set(data, mode="i2i")
    assert not load_eval_set(data, mode="i2i", relevance="ids").leave_one_out
