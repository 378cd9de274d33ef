"""A tiny Qwen3-VL embedder served (one real Serve instance, real HTTP) and batch-embedded (one Ray Data job), with
instructions: every vector must equal the in-process Predictor's, which tests/test_vlm_predictor.py checks against
the official format. The same Serve instance also serves the tiny ColQwen-style multi-vector model under
``/colqwen`` (its Predictor is checked against plain transformers in tests/test_multivector_vlm.py)."""

from __future__ import annotations

import argparse
import base64
import shutil
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.ray

MODEL = "tiny-vl"
MULTI_VECTOR_PREFIX = "/colqwen"
ATOL = 1e-5
TASK = "Find the shape that the caption describes"
PRESETS = {"caption": TASK}
TEXTS = ["a red circle", "a large blue square on a white background next to a small green triangle"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image_paths(shapes_t2i) -> list[Path]:
    return sorted(shapes_t2i["images"].glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def predictor(tiny_qwen3_vl_dir):
    from vembed.inference import VEmbedFactoryPredictor

    return VEmbedFactoryPredictor(tiny_qwen3_vl_dir, device="cpu")


@pytest.fixture(scope="module")
def colqwen_predictor(tiny_colqwen_dir):
    from vembed.inference import VEmbedFactoryPredictor

    return VEmbedFactoryPredictor(tiny_colqwen_dir, device="cpu")


@pytest.fixture(scope="module")
def http(ray_local, tiny_qwen3_vl_dir, tiny_colqwen_dir):
    from ray import serve

    from vembed.serving.cli import add_arguments, run

    port = _free_port()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", str(tiny_qwen3_vl_dir), "--model-name", MODEL, "--port", str(port), "--detach"]
    argv += ["--max-batch-size", "8", "--batch-wait-ms", "20", "--api-key-env", "VEMBED_TEST_NO_SUCH_KEY"]
    argv += [f"--instruction-preset=caption={TASK}"]
    assert run(parser.parse_args(argv)) == 0
    # a second application of the same Serve instance: the multi-vector model, under its own route prefix
    argv = ["--model", str(tiny_colqwen_dir), "--model-name", "tiny-colqwen", "--port", str(port), "--detach"]
    argv += ["--name", "colqwen", "--route-prefix", MULTI_VECTOR_PREFIX, "--api-key-env", "VEMBED_TEST_NO_SUCH_KEY"]
    assert run(parser.parse_args(argv)) == 0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180) as client:
        yield client
    serve.shutdown()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_openai_embeddings_with_images_and_instruction_equal_the_predictor(http, predictor, image_paths):
    items = [
        TEXTS[0],
        {"type": "image", "image": _b64(image_paths[0])},
        TEXTS[1],
        {"type": "image", "image": _b64(image_paths[1])},
    ]
    images = [Image.open(p) for p in image_paths[:2]]
    for extra, instruction in (({}, None), ({"instruction": TASK}, TASK), ({"instruction_name": "caption"}, TASK)):
        response = http.post("/v1/embeddings", json={"model": MODEL, "input": items, **extra})
        assert response.status_code == 200, response.text
        got = np.array([row["embedding"] for row in response.json()["data"]])
        np.testing.assert_allclose(got[[0, 2]], predictor.encode_text(TEXTS, instruction=instruction), atol=ATOL)
        np.testing.assert_allclose(got[[1, 3]], predictor.encode_image(images, instruction=instruction), atol=ATOL)
    plain = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[0]}).json()["data"][0]["embedding"]
    assert float(np.dot(plain, got[0])) < 0.9999  # the instruction changes the vector


def test_embed_endpoints_and_similarity_take_instructions(http, predictor, image_paths):
    got = http.post("/embed/text", json={"texts": TEXTS, "instruction": TASK}).json()["embeddings"]
    np.testing.assert_allclose(got, predictor.encode_text(TEXTS, instruction=TASK), atol=ATOL)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in image_paths]
    upload = http.post("/embed/image", files=files, data={"instruction_name": "caption"})
    assert upload.status_code == 200, upload.text
    np.testing.assert_allclose(
        upload.json()["embeddings"], predictor.encode_image([str(p) for p in image_paths], instruction=TASK), atol=ATOL
    )
    docs = [{"type": "image", "image": _b64(p)} for p in image_paths]
    scores = http.post("/similarity", json={"query_text": TEXTS[0], "documents": docs, "instruction": TASK}).json()
    expected = predictor.similarity(query_text=TEXTS[0], documents=[str(p) for p in image_paths], instruction=TASK)
    np.testing.assert_allclose(scores["scores"], expected, atol=ATOL)
    both = http.post("/embed/text", json={"texts": "x", "instruction": TASK, "instruction_name": "caption"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "instruction_name"
    unknown = http.post("/embed/text", json={"texts": "x", "instruction_name": "query"})
    assert unknown.status_code == 400 and "presets: caption" in unknown.json()["error"]["message"]


def test_multi_vector_embed_image_and_text_return_the_predictors_vector_lists(http, colqwen_predictor, image_paths):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in image_paths]
    response = http.post(f"{MULTI_VECTOR_PREFIX}/embed/image", files=files, data={"instruction": TASK})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = colqwen_predictor.encode_image([str(p) for p in image_paths], instruction=TASK)
    assert body["dimensions"] == 16 and body["num_vectors"] == [len(e) for e in expected]
    assert all(len(e) > 1 for e in expected)  # one vector per image token
    for got, want in zip(body["embeddings"], expected, strict=True):
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=1e-4)
    texts = http.post(f"{MULTI_VECTOR_PREFIX}/embed/text", json={"texts": TEXTS}).json()
    for got, want in zip(texts["embeddings"], colqwen_predictor.encode_text(TEXTS), strict=True):
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=1e-4)
    refused = http.post(f"{MULTI_VECTOR_PREFIX}/v1/embeddings", json={"model": "tiny-colqwen", "input": TEXTS[0]})
    assert refused.status_code == 400 and "multi-vector" in refused.json()["error"]["message"]


def test_batch_embedding_with_instruction_equals_the_predictor(
    ray_local, tiny_qwen3_vl_dir, predictor, image_paths, tmp_path
):
    from vembed.batch import embed_corpus, read_embeddings

    folder = tmp_path / "images"
    folder.mkdir()
    for path in image_paths:
        shutil.copy(path, folder / path.name)
    output = tmp_path / "embedded"
    embed_corpus(
        str(tiny_qwen3_vl_dir), str(folder), str(output), num_actors=1, max_decoders=1, batch_size=2, instruction=TASK
    )
    rows = {row["id"]: row["embedding"] for row in read_embeddings(str(output)).to_pylist()}
    expected = predictor.encode_image([str(p) for p in image_paths], instruction=TASK)
    np.testing.assert_allclose([rows[p.name] for p in image_paths], expected, atol=ATOL)


def test_embed_cli_refuses_an_instruction_for_a_model_without_one(tiny_clip_dir, tmp_path, capsys):
    from vembed.cli import main

    argv = ["embed", "--model", str(tiny_clip_dir), "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main([*argv, "--instruction", "Find it"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vembed embed:")]
    assert len(errors) == 1 and "takes no instruction" in errors[0]
