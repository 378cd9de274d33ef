"""One input, one vector (issue 16): for every family, the training forward (the Ray Data task's preprocessing and
the worker's collate), the Predictor and batch embedding's decode + embed steps give each input the vector that
plain transformers gives it ALONE, whatever else is in the batch (mixed lengths). Serve runs the Predictor's own
encode_* on batches of concurrent requests (tests/test_serving.py, tests/test_vlm_serving.py check Serve and the
Ray Data job end to end against the Predictor), so batch-independence here carries over to them.

The references are written out per family with AutoModel + AutoTokenizer + AutoImageProcessor, one input at a time.
"""

from __future__ import annotations

import functools

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

pytestmark = pytest.mark.unit

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
