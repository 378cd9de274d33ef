"""VEmbedFactoryPredictor: shapes, batching invariance, Matryoshka, and clear errors for bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vembed.inference import VEmbedFactoryPredictor
from vembed.model import EmbeddingModel

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def predictor(tiny_clip_dir):
    return VEmbedFactoryPredictor(tiny_clip_dir)


@pytest.fixture(scope="module")
def image_paths(shapes_t2i):
    return sorted(str(p) for p in shapes_t2i["images"].iterdir())[:5]


def test_single_and_list_shapes(predictor, image_paths):
    assert predictor.encode_text("a cat sitting on a chair").shape == (32,)
    texts = predictor.encode_text(["a cat", "a dog", "a bird"], batch_size=32)
    assert texts.shape == (3, 32) and texts.dtype == np.float32
    assert predictor.encode_image(image_paths[0]).shape == (32,)
    assert predictor.encode_image(image_paths[:3]).shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_matches_the_model_directly(predictor, tiny_clip_dir, image_paths):
    """The Predictor adds batching and sorting, never different maths."""
    model = EmbeddingModel.from_pretrained(tiny_clip_dir).eval()
    tokens = predictor.preprocessor.process_texts(["a red circle on a white background"])
    with torch.no_grad():
        ref = model.encode_text(torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"]))
    np.testing.assert_allclose(predictor.encode_text("a red circle on a white background"), ref[0].numpy(), atol=1e-6)


def test_batching_and_length_sorting_do_not_change_vectors(predictor):
    texts = ["x", "a much longer caption about a large blue square", "a red circle", "green"] * 3
    one_by_one = np.stack([predictor.encode_text(t) for t in texts])
    np.testing.assert_allclose(predictor.encode_text(texts, batch_size=5), one_by_one, atol=1e-5)


def test_image_inputs_paths_pil_and_bytes_agree(predictor, image_paths):
    path = image_paths[0]
    raw = open(path, "rb").read()
    with Image.open(path) as img:
        pil = img.convert("RGB")
    vectors = predictor.encode_image([path, pil, raw])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)


def test_similarity_returns_one_cosine_per_document(predictor, image_paths):
    sims = predictor.similarity(query_text="a red circle", documents=image_paths[:3])
    assert sims.shape == (3,)
    expected = predictor.encode_image(image_paths[:3]) @ predictor.encode_text("a red circle")
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    mixed = predictor.similarity(query_image=image_paths[0], documents=[image_paths[0], "a red circle"])
    assert mixed[0] == pytest.approx(1.0, abs=1e-5)


def test_matryoshka_dimension_truncates_and_renormalises(predictor, tiny_clip_dir):
    full = predictor.encode_text("a blue square")
    short = predictor.encode_text("a blue square", dimension=8)
    np.testing.assert_allclose(short, full[:8] / np.linalg.norm(full[:8]), atol=1e-6)
    assert VEmbedFactoryPredictor(tiny_clip_dir, mrl_dim=16).encode_text(["a", "b"]).shape == (2, 16)


def test_half_precision_dtypes_stay_close(tiny_clip_dir, predictor):
    bf16 = VEmbedFactoryPredictor(tiny_clip_dir, dtype="bfloat16")
    out = bf16.encode_text("a small yellow cross")
    assert out.dtype == np.float32
    assert float(out @ predictor.encode_text("a small yellow cross")) > 0.99


def test_bad_inputs_raise_clear_errors(tiny_clip_dir, predictor, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path"):
        VEmbedFactoryPredictor(tmp_path / "missing-model")
    with pytest.raises(ValueError, match="dtype='float8'"):
        VEmbedFactoryPredictor(tiny_clip_dir, dtype="float8")
    with pytest.raises(ValueError, match="pooling_method='max'"):
        VEmbedFactoryPredictor(tiny_clip_dir, pooling_method="max")
    with pytest.raises(ValueError, match="texts is empty"):
        predictor.encode_text([])
    with pytest.raises(ValueError, match="images is empty"):
        predictor.encode_image([])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a jpeg")
    with pytest.raises(ValueError, match=r"images\[0\].*notes.jpg"):
        predictor.encode_image([str(not_image)])
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        predictor.encode_image(str(tmp_path / "nowhere.jpg"))
    with pytest.raises(ValueError, match="dimension=64"):
        predictor.encode_text("a", dimension=64)
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        predictor.encode_text(["fine", "  "])


def test_pooling_override_is_applied(tiny_bert_dir):
    cls = VEmbedFactoryPredictor(tiny_bert_dir, pooling_method="cls").encode_text("a red circle")
    mean = VEmbedFactoryPredictor(tiny_bert_dir, pooling_method="mean").encode_text("a red circle")
    assert not np.allclose(cls, mean)


def test_corrupt_image_bytes_are_rejected(predictor):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="JPEG")
    with pytest.raises(ValueError, match=r"images\[0\]"):
        predictor.encode_image([buf.getvalue()[:40]])


def test_trained_model_ranks_the_right_image_first_for_held_out_captions(trained_clip):
    """Held-out captions against one image per record: the trained model puts a same-class image first far more
    often than the untrained start (chance is about 1 in 24 classes)."""
    import json

    records = [json.loads(line) for line in trained_clip["test"].read_text().splitlines()]
    labels = np.array([r["label"] for r in records])

    def top1_class_accuracy(model_dir) -> float:
        predictor = VEmbedFactoryPredictor(model_dir)
        queries = predictor.encode_text([r["query"] for r in records])
        images = predictor.encode_image([r["positive"] for r in records])
        return float((labels[np.argmax(queries @ images.T, axis=1)] == labels).mean())

    trained, untrained = top1_class_accuracy(trained_clip["model"]), top1_class_accuracy(trained_clip["base"])
    assert trained >= 0.3 and trained > untrained + 0.2, (trained, untrained)
    predictor = VEmbedFactoryPredictor(trained_clip["model"])
    documents = [r["positive"] for r in records]
    first = [labels[int(np.argmax(predictor.similarity(query_text=r["query"], documents=documents)))] for r in records]
    assert np.mean(np.array(first) == labels) == pytest.approx(trained)
