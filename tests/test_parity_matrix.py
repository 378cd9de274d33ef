"""One input, one vector (issue 16): for every family, the training forward (the Ray Data task's preprocessing and
the worker's collate), the Predictor and batch embedding's decode + embed steps give each input the vector that
plain transformers gives it ALONE, whatever else is in the batch (mixed lengths).

The real front ends too, for SigLIP, BERT (mean and cls) and Qwen3-Embedding: one Serve instance on real HTTP
serving the four models (one application each), and one real Ray batch-embedding job per model in the session's
Ray. CLIP's and the VLM's are in tests/test_serving.py, tests/test_batch_embed.py and tests/test_vlm_serving.py.

The references are written out per family with AutoModel + AutoTokenizer + AutoImageProcessor, one input at a time.
"""

from __future__ import annotations

import base64
import functools
import json
import socket

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from tests.vlm_reference import official_embeddings, official_inputs
from vembed.batch.pipeline import Decoder, Embedder, check_texts
from vembed.data.pipeline import PickledPreprocessor, collate_train_batch, preprocess_records
from vembed.data.processing import Preprocessor
from vembed.inference import VEmbedFactoryPredictor
from vembed.model import EmbeddingModel

ATOL = 1e-5
TEXTS = [
    "a red circle",
    "a large blue square on a white background next to a small green triangle and a yellow star",
    "green",
]


@functools.lru_cache(maxsize=2)
def _plain(model_dir: str):
    """The plain transformers model, tokenizer and image processor of a directory (loaded once per family)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        images = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError):
        images = None
    return AutoModel.from_pretrained(model_dir).eval(), tokenizer, images


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _text_alone(family: str, model_dir, text: str) -> np.ndarray:
    """The released recipe of each family for one text."""
    if family == "vlm":
        return official_embeddings(model_dir, official_inputs(model_dir, [text], [None]))[0]
    model, tokenizer, _ = _plain(str(model_dir))
    # SigLIP was trained on texts padded to its 64 positions; the others on unpadded texts
    padding = {"padding": "max_length", "max_length": 64} if family == "siglip" else {"max_length": 77}
    enc = tokenizer([text], truncation=True, return_tensors="pt", **padding)
    with torch.no_grad():
        if family in ("clip", "siglip"):
            vec = _features(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        else:
            states = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            vec = {"bert_mean": states.mean(dim=1), "bert_cls": states[:, 0], "qwen3": states[:, -1]}[family]
    return F.normalize(vec, dim=-1)[0].numpy()


def _image_alone(family: str, model_dir, image: Image.Image) -> np.ndarray:
    if family == "vlm":
        return official_embeddings(model_dir, official_inputs(model_dir, [None], [image]))[0]
    model, _, processor = _plain(str(model_dir))
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)[0].numpy()


FAMILIES = {  # name -> (fixture, pooling, retrieval mode of its training batch)
    "clip": ("tiny_clip_dir", "auto", "t2i"),
    "siglip": ("tiny_siglip_dir", "auto", "t2i"),
    "bert_mean": ("tiny_bert_dir", "mean", "t2t"),
    "bert_cls": ("tiny_bert_dir", "cls", "t2t"),
    "qwen3": ("tiny_qwen3_embedding_dir", "auto", "t2t"),
    "vlm": ("tiny_qwen3_vl_dir", "auto", "t2i"),
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("parity_images")
    paths = []
    for i, (colour, size) in enumerate(
        (((220, 30, 30), (32, 32)), ((30, 30, 220), (48, 40)), ((30, 200, 30), (40, 56)))
    ):
        image = Image.new("RGB", size, colour)
        for x in range(0, size[0], 3):
            image.putpixel((x, (x * (i + 2)) % size[1]), (250, 250, 0))
        image.save(root / f"img{i}.png")
        paths.append(root / f"img{i}.png")
    return paths


@pytest.mark.unit
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_path_gives_each_input_its_own_vector(family, request, image_files):
    fixture, pooling, mode = FAMILIES[family]
    model_dir = request.getfixturevalue(fixture)
    text_ref = np.stack([_text_alone(family, model_dir, t) for t in TEXTS])
    images = [Image.open(p).convert("RGB") for p in image_files]
    image_ref = np.stack([_image_alone(family, model_dir, im) for im in images]) if mode == "t2i" else None
    overrides = {} if pooling == "auto" else {"pooling_method": pooling}

    # training forward: the Ray Data task's function (padded to max_text_length) and the worker's collate
    pre = Preprocessor.from_pretrained(model_dir)
    model = EmbeddingModel.from_config({"model_name": str(model_dir), **overrides}).eval()
    positives = [str(p) for p in image_files] if mode == "t2i" else list(reversed(TEXTS))
    table = pa.Table.from_pylist([{"query": q, "positive": p} for q, p in zip(TEXTS, positives, strict=True)])
    rows = preprocess_records(
        table, preprocessor=PickledPreprocessor(pre), retrieval_mode=mode, on_bad_record="fail", bad_records=None
    )
    with torch.no_grad():
        trained = model(**collate_train_batch(rows))
    np.testing.assert_allclose(trained["query"].numpy(), text_ref, atol=ATOL, err_msg="training forward, texts")
    positive_ref = image_ref if mode == "t2i" else text_ref[::-1]
    np.testing.assert_allclose(trained["positive"].numpy(), positive_ref, atol=ATOL, err_msg="training forward")

    # Predictor: alone and inside a mixed-length batch
    predictor = VEmbedFactoryPredictor(model_dir, device="cpu", **overrides)
    np.testing.assert_allclose(predictor.encode_text(TEXTS), text_ref, atol=ATOL, err_msg="Predictor batch")
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(predictor.encode_text(text), text_ref[i], atol=ATOL, err_msg="Predictor alone")
    if image_ref is not None:
        np.testing.assert_allclose(predictor.encode_image(images), image_ref, atol=ATOL, err_msg="Predictor images")

    # batch embedding: its decode and embed steps (the Ray Data actors' classes) on one mixed batch
    if family in ("bert_cls", "bert_mean"):
        return  # the batch job loads a model as saved/raw, with its own pooling (covered by the mean family above)
    position = np.arange(len(TEXTS))
    texts = check_texts({"position": position, "id": position.astype(str), "source": np.array(TEXTS, dtype=object)})
    embedder = Embedder(str(model_dir), "text", "float32", None, False)
    np.testing.assert_allclose(embedder(texts)["embedding"], text_ref, atol=ATOL, err_msg="batch embedding texts")
    if image_ref is not None:
        sources = np.array([str(p) for p in image_files], dtype=object)
        decoded = Decoder(str(model_dir))({"position": position, "id": position.astype(str), "source": sources})
        got = Embedder(str(model_dir), "image", "float32", None, False)(decoded)["embedding"]
        np.testing.assert_allclose(got, image_ref, atol=ATOL, err_msg="batch embedding images")


# ---------------------------------------------------------------------------------- real Serve and real batch jobs

#: family -> the pooling its served / batch-embedded model records (a vembed checkpoint of the same weights), or
#: None for the raw Hugging Face directory
FRONT_END_FAMILIES = {"siglip": None, "bert_mean": "mean", "bert_cls": "cls", "qwen3": None}


@pytest.fixture(scope="module")
def front_end_models(request, tmp_path_factory) -> dict:
    """The directory the front ends load per family: the fixture's own, or a vembed save recording the pooling."""
    root = tmp_path_factory.mktemp("parity_front_end_models")
    models = {}
    for family, pooling in FRONT_END_FAMILIES.items():
        source = request.getfixturevalue(FAMILIES[family][0])
        if pooling is None:
            models[family] = source
        else:
            model = EmbeddingModel.from_config({"model_name": str(source), "pooling_method": pooling})
            models[family] = model.save_pretrained(root / family)
    return models


def _references(family: str, request, image_files=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The plain-transformers vectors of ``TEXTS`` (and of ``image_files`` for an image-text family), each alone."""
    model_dir = request.getfixturevalue(FAMILIES[family][0])
    text_ref = np.stack([_text_alone(family, model_dir, t) for t in TEXTS])
    if image_files is None or FAMILIES[family][2] != "t2i":
        return text_ref, None
    images = [Image.open(p).convert("RGB") for p in image_files]
    return text_ref, np.stack([_image_alone(family, model_dir, im) for im in images])


@pytest.mark.ray
@pytest.mark.parametrize("family", list(FRONT_END_FAMILIES))
def test_ray_batch_job_gives_each_input_its_own_vector(family, ray_local, front_end_models, request, tmp_path):
    """One real job (Ray Data, a model actor, Parquet shards). With ``batch_size=3`` the job's blocks are multiples
    of 3 rows (``block_rows``), so the three texts go through the model together (mixed lengths) and the fourth
    row, the shortest text again, alone."""
    from vembed.batch import embed_corpus, read_embeddings

    text_ref, _ = _references(family, request)
    rows = [*TEXTS, TEXTS[2]]
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(rows)))
    summary = embed_corpus(
        str(front_end_models[family]), str(manifest), str(tmp_path / "out"), modality="text",
        source_column="text", batch_size=3, shard_size=8, num_actors=1,
    )  # fmt: skip
    assert summary["embedded"] == len(rows) and summary["errors"] == 0
    table = read_embeddings(str(tmp_path / "out"))
    got = dict(zip(table.column("id").to_pylist(), np.array(table.column("embedding").to_pylist()), strict=True))
    expected = [*text_ref, text_ref[2]]
    for i in range(len(rows)):
        np.testing.assert_allclose(got[f"t{i}"], expected[i], atol=ATOL, err_msg=f"batch job, row {i}")


@pytest.fixture(scope="module")
def serve_url(ray_local, front_end_models):
    """ONE Serve start (HTTP on 127.0.0.1) with one application per family, deployed together."""
    from ray import serve

    from vembed.serving.app import embedding_app
    from vembed.serving.settings import DeploymentSettings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"max_batch_size": 8, "batch_wait_ms": 20, "request_timeout_s": 120}
    targets = [
        serve.RunTarget(
            target=embedding_app(
                {"model": str(path), "model_name": family, **settings}, DeploymentSettings.from_flat({"num_cpus": 0.25})
            ),
            name=f"parity-{family}",
            route_prefix=f"/{family}",
        )
        for family, path in front_end_models.items()
    ]
    serve.run_many(targets)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize("family", list(FRONT_END_FAMILIES))
def test_serve_over_http_gives_each_input_its_own_vector(family, serve_url, request, image_files):
    text_ref, image_ref = _references(family, request, image_files)
    with httpx.Client(base_url=f"{serve_url}/{family}", timeout=180) as http:

        def embed(items: list) -> np.ndarray:
            body = {"model": family, "input": items, "encoding_format": "float"}
            response = http.post("/v1/embeddings", json=body)
            assert response.status_code == 200, response.text
            return np.array([row["embedding"] for row in response.json()["data"]])

        np.testing.assert_allclose(embed(TEXTS), text_ref, atol=ATOL, err_msg="Serve, mixed-length batch")
        for i, text in enumerate(TEXTS):
            np.testing.assert_allclose(embed([text])[0], text_ref[i], atol=ATOL, err_msg="Serve, alone")
        if image_ref is not None:
            items = [{"type": "image", "image": base64.b64encode(p.read_bytes()).decode()} for p in image_files]
            np.testing.assert_allclose(embed(items), image_ref, atol=ATOL, err_msg="Serve, images together")
            np.testing.assert_allclose(embed(items[:1])[0], image_ref[0], atol=ATOL, err_msg="Serve, image alone")
