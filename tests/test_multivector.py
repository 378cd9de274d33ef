"""Late-interaction (ColBERT-style) models end to end: Predictor, evaluation, batch embedding and Serve.

References are independent of vembed's code: token vectors from plain ``transformers`` plus the saved head weight,
MaxSim and the retrieval metrics with explicit Python loops. One Ray Train run (through the seed API) is shared by
the Ray checks; Serve starts one app.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

TEXTS = ["a red circle", "a big blue square on the left of a small green triangle next to a yellow star", "star"]
ATOL = 1e-4


# ---- references (loops, plain transformers) --------------------------------------------------------------------


def loop_maxsim(query: np.ndarray, doc: np.ndarray) -> float:
    """sum over query vectors of the best dot product with any document vector."""
    return float(sum(max(float(np.dot(q, d)) for d in doc) for q in query))


def loop_metrics(queries: list[np.ndarray], cands: list[np.ndarray], positive: list[int]) -> dict[str, float]:
    """recall@1 and MRR with one relevant candidate per query, ties counted against it (pessimistic)."""
    recall, mrr = 0.0, 0.0
    for q, pos in zip(queries, positive, strict=True):
        scores = [loop_maxsim(q, c) for c in cands]
        rank = 1 + sum(s > scores[pos] for i, s in enumerate(scores) if i != pos)
        recall += rank == 1
        mrr += 1.0 / rank
    return {"recall@1": recall / len(queries), "mrr": mrr / len(queries)}


def reference_vectors(model_dir: Path, text: str) -> np.ndarray:
    """The ColBERT vectors of one text, unpadded: BERT token states -> saved head -> L2-normalised rows."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    bert = AutoModel.from_pretrained(str(model_dir)).eval()
    head = load_file(str(model_dir / "heads.safetensors"))["text.weight"]
    with torch.no_grad():
        states = bert(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
    return torch.nn.functional.normalize(states @ head.T, dim=-1).numpy()


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colbert_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """An untrained ColBERT-style checkpoint: the tiny BERT, every token a vector, a 16-d projection head."""
    from vembed.model import EmbeddingModel

    torch.manual_seed(0)
    model = EmbeddingModel.from_pretrained(str(tiny_bert_dir), pooling_method="none", projection_dim=16)
    return model.save_pretrained(tmp_path_factory.mktemp("colbert") / "untrained")


@pytest.fixture(scope="module")
def colbert(colbert_dir):
    from vembed.inference import VEmbedFactoryPredictor

    return VEmbedFactoryPredictor(colbert_dir, device="cpu")


@pytest.fixture(scope="module")
def t2t(tmp_path_factory) -> dict[str, Path]:
    from vembed.testing import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("t2t"), num_train=96, num_val=8, num_test=24, mode="t2t", seed=3)


# ---- Predictor (no Ray) ------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_vectors_are_the_tokens_of_plain_transformers_one_array_per_text(colbert, colbert_dir):
    batch = colbert.encode_text(TEXTS)
    assert isinstance(batch, list) and len(batch) == len(TEXTS)
    for text, vectors in zip(TEXTS, batch, strict=True):
        expected = reference_vectors(colbert_dir, text)
        assert vectors.dtype == np.float32 and vectors.shape == expected.shape  # padding never included
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    single = colbert.encode_text(TEXTS[0])
    assert isinstance(single, np.ndarray) and single.shape == batch[0].shape
    spec = json.loads((colbert_dir / "vembed.json").read_text())
    assert spec["pooling_method"] == "none" and spec["vector_tokens"] == "non_padding"
    assert colbert.model_info["multi_vector"] is True


@pytest.mark.unit
def test_a_short_input_alone_equals_its_vectors_next_to_a_long_input(colbert):
    alone = colbert.encode_text([TEXTS[2]])[0]
    beside_long = colbert.encode_text([TEXTS[1], TEXTS[2]], batch_size=2)[1]
    assert alone.shape == beside_long.shape
    np.testing.assert_allclose(alone, beside_long, atol=1e-5)


@pytest.mark.unit
def test_similarity_is_maxsim_of_the_returned_arrays(colbert):
    docs = ["a red circle", "a blue square", "green triangles and a yellow star"]
    scores = colbert.similarity(query_text="red circle", documents=docs)
    query, doc_vectors = colbert.encode_text("red circle"), colbert.encode_text(docs)
    expected = [loop_maxsim(query, d) for d in doc_vectors]
    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-5)


@pytest.mark.unit
def test_matryoshka_dimension_per_vector_and_max_vectors_pruning(colbert, tiny_bert_dir):
    from vembed.inference import VEmbedFactoryPredictor

    full = colbert.encode_text(TEXTS)
    cut = colbert.encode_text(TEXTS, dimension=8)
    for f, c in zip(full, cut, strict=True):
        prefix = f[:, :8] / np.linalg.norm(f[:, :8], axis=1, keepdims=True)
        np.testing.assert_allclose(c, prefix, atol=1e-5)
    pruned = colbert.encode_text(TEXTS, max_vectors=4)
    for f, p in zip(full, pruned, strict=True):
        assert len(p) == min(4, len(f))
        rows = [int(np.argmin(np.abs(f - row).sum(1))) for row in p]  # each kept vector is one of the item's own
        assert rows == sorted(set(rows)) and np.allclose(f[rows], p, atol=1e-6)
    with pytest.raises(ValueError, match=r"dimension=17 must be an integer in 1\.\.16"):
        colbert.encode_text("a", dimension=17)
    with pytest.raises(ValueError, match="max_vectors=0 must be a positive integer"):
        colbert.encode_text("a", max_vectors=0)
    with pytest.raises(ValueError, match="max_vectors applies to multi-vector models only"):
        VEmbedFactoryPredictor(tiny_bert_dir).encode_text("a", max_vectors=2)


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["float32", "float16"])
def test_parquet_rows_hold_a_list_of_vectors_and_read_back(fmt):
    from vembed.batch.writer import embeddings_table, pack_vectors
    from vembed.evaluation.embedded import _vectors

    rng = np.random.default_rng(0)
    items = [rng.standard_normal((n, 6)).astype(np.float32) for n in (3, 1, 5)]
    packed, counts = pack_vectors(items)
    table = embeddings_table(np.array(["a", "b", "c"]), np.array(["x", "y", "z"]), packed, fmt, counts)
    assert table.column("num_vectors").to_pylist() == [3, 1, 5]
    assert table.column("embedding").to_pylist()[1] == [pytest.approx(items[1][0].tolist(), abs=1e-2)]
    back = _vectors(table.slice(1))  # a slice: offsets must be rebased
    assert [b.shape for b in back] == [(1, 6), (5, 6)]
    for got, want in zip(back, items[1:], strict=True):
        np.testing.assert_allclose(got, want, atol=2e-3 if fmt == "float16" else 0)


@pytest.mark.unit
def test_vembed_evaluate_scores_a_multi_vector_checkpoint_by_maxsim(colbert, colbert_dir, t2t, tmp_path):
    from vembed.evaluation.cli import main
    from vembed.evaluation.evalset import load_eval_set

    assert (
        main(["--model", str(colbert_dir), "--data", str(t2t["test"]), "--mode", "t2t", "--output", str(tmp_path)]) == 0
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    evalset = load_eval_set(t2t["test"], "t2t")
    expected = loop_metrics(
        colbert.encode_text(evalset.query_texts),
        colbert.encode_text(evalset.candidates),
        [evalset.candidates.index(p[0]) for p in evalset.positives],
    )
    assert {"recall@1", "ndcg@10", "mrr", "map"} <= set(metrics)
    assert metrics["recall@1"] == pytest.approx(expected["recall@1"]) and metrics["mrr"] == pytest.approx(
        expected["mrr"]
    )


# ---- trained through the seed API on Ray: evaluate, batch embedding, Serve -----------------------------------------


@pytest.fixture(scope="module")
def trained(ray_local, tiny_bert_dir, t2t, tmp_path_factory):
    """The one Ray Train run of this module: ColBERT-style maxsim training of the tiny BERT."""
    from vembed.trainer import VEmbedFactoryTrainer

    trainer = VEmbedFactoryTrainer(str(tiny_bert_dir), retrieval_mode="t2t")
    output = tmp_path_factory.mktemp("colbert_run") / "output"
    torch.manual_seed(0)
    trainer.train(
        str(t2t["train"]),
        str(output),
        epochs=3,
        batch_size=32,
        learning_rate=2e-3,
        loss_type="maxsim",
        pooling_method="none",
        projection_dim=16,
    )
    return trainer


@pytest.fixture(scope="module")
def trained_predictor(trained):
    from vembed.inference import VEmbedFactoryPredictor

    return VEmbedFactoryPredictor(trained.last_checkpoint, device="cpu")


@pytest.mark.ray
def test_trained_evaluate_returns_maxsim_metrics_and_beats_untrained(trained, trained_predictor, colbert_dir, t2t):
    from vembed.evaluation.evalset import load_eval_set
    from vembed.evaluation.evaluator import evaluate_model_path

    after = trained.evaluate(str(t2t["test"]))
    before = evaluate_model_path(colbert_dir, t2t["test"], mode="t2t")
    assert {"recall@1", "recall@5", "ndcg@10", "mrr"} <= set(after)
    assert after["mrr"] > before["mrr"] + 0.1, (before, after)
    assert after["recall@1"] > before["recall@1"]
    evalset = load_eval_set(t2t["test"], "t2t")
    expected = loop_metrics(
        trained_predictor.encode_text(evalset.query_texts),
        trained_predictor.encode_text(evalset.candidates),
        [evalset.candidates.index(p[0]) for p in evalset.positives],
    )
    assert after["recall@1"] == pytest.approx(expected["recall@1"]) and after["mrr"] == pytest.approx(expected["mrr"])


@pytest.fixture(scope="module")
def embedded(trained, t2t, tmp_path_factory) -> Path:
    """The trained model's candidates (the test set's distinct positives) embedded by a batch job, float32."""
    from vembed.batch import embed_corpus
    from vembed.evaluation.evalset import load_eval_set

    root = tmp_path_factory.mktemp("colbert_embed")
    texts = load_eval_set(t2t["test"], "t2t").candidates
    manifest = root / "docs.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    output = root / "out"
    embed_corpus(
        str(trained.last_checkpoint), str(manifest), str(output), modality="text", batch_size=8, shard_size=16,
        num_actors=1,
    )  # fmt: skip
    return output


@pytest.mark.ray
def test_batch_rows_equal_the_predictor_and_load_back_for_evaluation(embedded, trained, trained_predictor, t2t):
    from vembed.batch import read_embeddings, read_manifest
    from vembed.evaluation.embedded import evaluate_with_ray

    table = read_embeddings(str(embedded))
    texts = table.column("source").to_pylist()
    expected = trained_predictor.encode_text(texts)
    rows = table.column("embedding").to_pylist()
    assert table.column("num_vectors").to_pylist() == [len(e) for e in expected]
    for row, want in zip(rows, expected, strict=True):
        np.testing.assert_allclose(np.asarray(row, dtype=np.float32), want, atol=ATOL)
    assert read_manifest(str(embedded))["embedding_dim"] == 16

    # ray_jobs/evaluate.py's path: the rows as the candidate pool, the queries embedded by a second batch job
    from_rows = evaluate_with_ray(
        trained.last_checkpoint, t2t["test"], mode="t2t", candidates_embeddings=str(embedded), num_actors=1
    )
    assert from_rows["num_positives_missing"] == 0
    direct = trained.evaluate(str(t2t["test"]))
    assert {k: from_rows[k] for k in direct} == pytest.approx(direct, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained):
    """One Serve app with the trained multi-vector model, deployed the way ``vembed serve --detach`` does."""
    from ray import serve

    from vembed.serving.cli import add_arguments, run

    port = _free_port()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", str(trained.last_checkpoint), "--model-name", "colbert", "--port", str(port), "--detach"]
    assert run(parser.parse_args(argv)) == 0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client
    serve.shutdown()


@pytest.mark.ray
def test_serve_returns_vector_lists_maxsim_and_refuses_the_openai_route(served, trained_predictor):
    response = served.post("/embed/text", json={"texts": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = trained_predictor.encode_text(TEXTS)
    assert body["dimensions"] == 16 and body["num_vectors"] == [len(e) for e in expected]
    for got, want in zip(body["embeddings"], expected, strict=True):
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=ATOL)

    docs = ["a red circle", "a blue square"]
    response = served.post("/similarity", json={"query_text": "red circle", "documents": docs})
    assert response.status_code == 200, response.text
    query, doc_vectors = trained_predictor.encode_text("red circle"), trained_predictor.encode_text(docs)
    np.testing.assert_allclose(response.json()["scores"], [loop_maxsim(query, d) for d in doc_vectors], atol=ATOL)

    refused = served.post("/v1/embeddings", json={"input": ["a red circle"], "model": "colbert"})
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "multi-vector" in message and "/embed/text" in message
    assert served.get("/health").status_code == 200  # the replica keeps serving
