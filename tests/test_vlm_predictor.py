"""The Predictor for vision-language embedders (tiny Qwen3-VL) and Qwen3-Embedding, against the official formats
computed with plain transformers (``tests/vlm_reference.py`` writes out the VLM recipe; Qwen3-Embedding's is below).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoTokenizer

from tests.vlm_reference import official_embeddings, official_inputs, patterned_images
from vembed.inference import VEmbedFactoryPredictor
from vembed.model import EmbeddingModel

pytestmark = pytest.mark.unit

TEXTS = ["a red circle", "a large blue square on a white background next to a small green triangle"]


def _images() -> list[Image.Image]:
    return patterned_images(((32, 32), (48, 40)))


@pytest.fixture(scope="module")
def vlm(tiny_qwen3_vl_dir):
    return VEmbedFactoryPredictor(tiny_qwen3_vl_dir, device="cpu")


def _official(model_dir, texts, images, instruction="Represent the user's input."):
    return official_embeddings(model_dir, official_inputs(model_dir, texts, images, instruction=instruction))


def test_vlm_predictor_equals_the_official_format(vlm, tiny_qwen3_vl_dir):
    images = _images()
    np.testing.assert_allclose(vlm.encode_text(TEXTS), _official(tiny_qwen3_vl_dir, TEXTS, [None, None]), atol=1e-4)
    np.testing.assert_allclose(vlm.encode_image(images), _official(tiny_qwen3_vl_dir, [None, None], images), atol=1e-4)
    np.testing.assert_allclose(
        vlm.encode_multimodal(TEXTS, images), _official(tiny_qwen3_vl_dir, TEXTS, images), atol=1e-4
    )
    # an instruction without final punctuation gets a "." (the official rule)
    np.testing.assert_allclose(
        vlm.encode_text(TEXTS, instruction="Retrieve the matching image"),
        _official(tiny_qwen3_vl_dir, TEXTS, [None, None], "Retrieve the matching image."),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        vlm.encode_image(images, instruction="Describe it!"),
        _official(tiny_qwen3_vl_dir, [None, None], images, "Describe it!"),
        atol=1e-4,
    )


def test_vlm_vectors_do_not_depend_on_the_batch_and_differ_between_inputs(vlm):
    images = _images()
    alone = vlm.encode_text(TEXTS[0])
    mixed = vlm.encode_text([TEXTS[0], TEXTS[1] * 3, "x"])
    np.testing.assert_allclose(mixed[0], alone, atol=1e-5)
    np.testing.assert_allclose(vlm.encode_image([images[0], images[1]])[0], vlm.encode_image(images[0]), atol=1e-5)
    vectors = np.stack([*vlm.encode_text(TEXTS), *vlm.encode_image(images), *vlm.encode_multimodal(TEXTS, images)])
    cosines = vectors @ vectors.T
    assert np.max(cosines[~np.eye(len(vectors), dtype=bool)]) < 0.999  # the every-input-one-vector bug is caught
    assert vlm.encode_text(TEXTS[0], instruction="Find a picture") @ alone < 0.9999
    scores = vlm.similarity(query_text=TEXTS[0], documents=images, instruction="Find a picture")
    np.testing.assert_allclose(
        scores, vlm.encode_image(images) @ vlm.encode_text(TEXTS[0], instruction="Find a picture"), atol=1e-5
    )


def _qwen3_embedding_reference(model_dir, texts, max_length=512):
    """Qwen3-Embedding as released: left padding, ``<|endoftext|>`` appended, last token, L2-normalised."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    return F.normalize(states[:, -1], dim=-1).numpy()  # left padding: the last position is the last token


def test_qwen3_embedding_documents_and_instructed_queries(tiny_qwen3_embedding_dir):
    predictor = VEmbedFactoryPredictor(tiny_qwen3_embedding_dir, device="cpu")
    np.testing.assert_allclose(
        predictor.encode_text(TEXTS), _qwen3_embedding_reference(tiny_qwen3_embedding_dir, TEXTS), atol=1e-4
    )
    task = "Given a caption, retrieve the shape it describes"
    queries = [f"Instruct: {task}\nQuery:{text}" for text in TEXTS]
    np.testing.assert_allclose(
        predictor.encode_text(TEXTS, instruction=task),
        _qwen3_embedding_reference(tiny_qwen3_embedding_dir, queries),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        predictor.encode_text([TEXTS[0], TEXTS[1] * 4], instruction=task)[0],
        predictor.encode_text(TEXTS[0], instruction=task),
        atol=1e-5,
    )


def test_instruction_for_a_model_without_instructions_is_a_clear_error(tiny_clip_dir):
    predictor = VEmbedFactoryPredictor(tiny_clip_dir, device="cpu")
    for call in (
        lambda: predictor.encode_text("a cat", instruction="Find"),
        lambda: predictor.encode_image(Image.new("RGB", (8, 8)), instruction="Find"),
        lambda: predictor.similarity(query_text="a cat", documents=["a dog"], instruction="Find"),
    ):
        with pytest.raises(ValueError, match=r"this model takes no instruction \(got instruction='Find'\)"):
            call()


def test_vlm_bad_inputs_name_the_problem(tiny_qwen3_vl_dir, tmp_path):
    short = VEmbedFactoryPredictor(tiny_qwen3_vl_dir, device="cpu", max_text_length=60)
    with pytest.raises(ValueError, match=r"image tokens .* exceed max_text_length=60"):
        short.encode_image([Image.new("RGB", (128, 128), (1, 2, 3))])
    broken = tmp_path / "vl_without_processor"
    shutil.copytree(tiny_qwen3_vl_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks its processor files: an image processor"):
        VEmbedFactoryPredictor(broken, device="cpu")


def test_lora_merged_checkpoint_reloads_with_plain_transformers(tiny_qwen3_vl_dir, tmp_path, vlm):
    from vembed.training.model_builder import apply_lora

    model = EmbeddingModel.from_pretrained(tiny_qwen3_vl_dir)
    apply_lora(model, {"model_name": str(tiny_qwen3_vl_dir), "use_lora": True, "lora_r": 4})
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: non-zero LoRA updates that the merge must carry
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    saved = model.save_pretrained(tmp_path / "ckpt")
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json", "model.safetensors"):
        assert (saved / name).is_file(), name
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert AutoTokenizer.from_pretrained(saved).chat_template
    spec = json.loads((saved / "vembed.json").read_text())
    assert spec["preprocessing"]["default_instruction"] == "Represent the user's input."
    images = _images()
    reloaded = VEmbedFactoryPredictor(saved, device="cpu")
    official = _official(saved, TEXTS, images)
    np.testing.assert_allclose(reloaded.encode_multimodal(TEXTS, images), official, atol=1e-4)
    assert np.max(np.abs(official - _official(tiny_qwen3_vl_dir, TEXTS, images))) > 1e-3  # LoRA was merged


def test_saved_instructions_apply_to_queries_and_documents_in_evaluation(tiny_qwen3_embedding_dir, tmp_path):
    from vembed.data.batching import build_batch
    from vembed.evaluation.evalset import EvalSet
    from vembed.evaluation.evaluator import encode_eval_set

    task = "Given a caption, retrieve the matching caption"
    config = {"model_name": str(tiny_qwen3_embedding_dir), "query_instruction": task, "max_text_length": 64}
    saved = EmbeddingModel.from_config(config).save_pretrained(tmp_path / "ckpt")
    predictor = VEmbedFactoryPredictor(saved, device="cpu")
    assert (predictor.preprocessor.query_instruction, predictor.preprocessor.max_text_length) == (task, 64)
    evalset = EvalSet("t2t", TEXTS, None, [[TEXTS[1]], [TEXTS[0]]], [TEXTS[1], TEXTS[0]], None, 2, "inline")
    queries, candidates = encode_eval_set(predictor, evalset)
    reference = _qwen3_embedding_reference(
        tiny_qwen3_embedding_dir, [f"Instruct: {task}\nQuery:{t}" for t in TEXTS] + [TEXTS[1], TEXTS[0]], 64
    )
    np.testing.assert_allclose(np.concatenate([queries, candidates]), reference, atol=1e-4)
    # the training batch of the same config instructs queries only, as the Predictor does
    batch, _ = build_batch([{"query": TEXTS[0], "positive": TEXTS[1]}], predictor.preprocessor, "t2t")
    with torch.no_grad():
        out = predictor.model(**{k: torch.as_tensor(v) for k, v in batch.items()})
    np.testing.assert_allclose(out["query"].numpy()[0], queries[0], atol=1e-5)
    np.testing.assert_allclose(out["positive"].numpy()[0], candidates[0], atol=1e-5)  # TEXTS[1], raw
