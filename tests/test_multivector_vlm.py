"""ColQwen-style multi-vector on the vlm family (``vector_tokens: content``) against an independent reference.

The reference is plain transformers and the tokenizer only (``tests/vlm_reference.py`` builds the official inputs):
an item's content positions are its ``<|image_pad|>`` tokens plus the tokens of its own text, found right before the
``<|im_end|>`` that closes the user turn; its vectors are the hidden states there times the saved head, L2-normalised.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from tests.vlm_reference import official_inputs, patterned_images

pytestmark = pytest.mark.unit

ATOL = 1e-4
TEXTS = ["a red circle", "a large blue square on a white background next to a small green triangle", "star"]


def _images() -> list[Image.Image]:
    return patterned_images(((32, 32), (96, 64)))


def content_positions(model_dir, input_ids: torch.Tensor, text: str | None) -> list[int]:
    """One item's content positions, from the tokenizer alone: image tokens, then the text's own tokens, which end
    where the user turn's ``<|im_end|>`` (the second one: system, then user) begins."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = input_ids.tolist()
    image = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<|image_pad|>")]
    if text is None:
        return image
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    end = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<|im_end|>")][1]
    assert ids[end - len(text_ids) : end] == text_ids, "the test texts must tokenise alike alone and in the template"
    return image + list(range(end - len(text_ids), end))


def reference_vectors(model_dir, texts, images) -> list[np.ndarray]:
    """Plain transformers: content positions' last hidden states x the saved head, rows L2-normalised."""
    inputs = official_inputs(model_dir, texts, images)
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    head = load_file(str(model_dir / "heads.safetensors"))["sequence.weight"]
    with torch.no_grad():
        states = model(**inputs).last_hidden_state
    out = []
    for i, text in enumerate(texts):
        rows = states[i, content_positions(model_dir, inputs["input_ids"][i], text)]
        out.append(F.normalize(rows @ head.T, dim=-1).numpy())
    return out


@pytest.fixture(scope="module")
def colqwen(tiny_colqwen_dir):
    from vembed.inference import VEmbedFactoryPredictor

    return VEmbedFactoryPredictor(tiny_colqwen_dir, device="cpu")


def _assert_vectors(got: list[np.ndarray], want: list[np.ndarray], atol: float = ATOL) -> None:
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=atol)


def test_content_mask_holds_the_text_and_image_tokens_and_no_template_token(tiny_qwen3_vl_dir):
    from vembed.data.processing import Preprocessor

    red, blue = _images()
    texts, images = [TEXTS[0], None, "assistant", TEXTS[1]], [None, red, blue, None]
    got = Preprocessor.from_pretrained(tiny_qwen3_vl_dir).process_conversations(texts, [[], [red], [blue], []])
    want = official_inputs(tiny_qwen3_vl_dir, texts, images)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"].numpy())
    expected = np.zeros_like(got["content_mask"])
    for i, text in enumerate(texts):
        expected[i, content_positions(tiny_qwen3_vl_dir, want["input_ids"][i], text)] = 1
    np.testing.assert_array_equal(got["content_mask"], expected)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3_vl_dir))
    template = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>")]
    assert not np.isin(got["input_ids"][got["content_mask"] == 1], template).any()
    kept = tokenizer.decode(got["input_ids"][2][got["content_mask"][2] == 1].tolist())
    assert kept == "<|image_pad|>" * int(got["mm_token_type_ids"][2].sum()) + "assistant"  # not the role name
    assert (got["content_mask"] <= got["attention_mask"]).all()


def test_predictor_vectors_equal_plain_transformers_for_text_image_and_both(colqwen, tiny_colqwen_dir):
    spec = json.loads((tiny_colqwen_dir / "vembed.json").read_text())
    assert spec["pooling_method"] == "none" and spec["vector_tokens"] == "content"
    assert colqwen.model_info["vector_tokens"] == "content"
    images = _images()
    _assert_vectors(colqwen.encode_text(TEXTS), reference_vectors(tiny_colqwen_dir, TEXTS, [None] * 3))
    _assert_vectors(colqwen.encode_image(images), reference_vectors(tiny_colqwen_dir, [None, None], images))
    pairs = TEXTS[:2]
    _assert_vectors(colqwen.encode_multimodal(pairs, images), reference_vectors(tiny_colqwen_dir, pairs, images))


def test_a_short_item_alone_equals_it_next_to_a_long_one(colqwen):
    short, long = TEXTS[2], TEXTS[1]
    alone = colqwen.encode_text([short])[0]
    _assert_vectors([colqwen.encode_text([long, short])[1]], [alone], atol=1e-5)
    small, large = _images()
    _assert_vectors([colqwen.encode_image([large, small])[1]], [colqwen.encode_image([small])[0]], atol=1e-5)
    assert len(alone) == len(AutoTokenizer.from_pretrained(str(colqwen.model_path))(short)["input_ids"])


def test_training_forward_and_maxsim_loss_use_the_content_tokens(tiny_colqwen_dir, colqwen, tmp_path):
    from vembed.data.batching import build_batch
    from vembed.data.collators import DefaultCollator
    from vembed.data.processing import Preprocessor
    from vembed.data.ragged import collate_rows
    from vembed.losses.factory import LossFactory
    from vembed.model import EmbeddingModel
    from vembed.testing import make_shapes_dataset

    data = make_shapes_dataset(tmp_path, num_train=4, num_val=0, num_test=0, mode="t2i", seed=5)
    records = [json.loads(line) for line in data["train"].read_text().splitlines()]
    preprocessor = Preprocessor.from_pretrained(tiny_colqwen_dir)
    batch = DefaultCollator(preprocessor, mode="train", retrieval_mode="t2i")(records)
    rows, _ = build_batch(records, preprocessor, "t2i", pad_to_max_length=True)  # the Ray Data path's rows
    for role in ("query", "positive"):
        through_rows = collate_rows(rows)[f"{role}_content_mask"]
        width = through_rows.shape[1]
        torch.testing.assert_close(through_rows, torch.as_tensor(batch[f"{role}_content_mask"])[:, :width])

    model = EmbeddingModel.from_pretrained(str(tiny_colqwen_dir)).eval()
    assert model.vector_tokens == "content"
    with torch.no_grad():
        out = model(**batch)
    queries = colqwen.encode_text([r["query"] for r in records])
    positives = colqwen.encode_image([r["positive"] for r in records])
    for role, key, expected in (("query", "query", queries), ("positive", "positive", positives)):
        mask = out[f"{role}_mask"].bool()
        assert torch.equal(mask, torch.as_tensor(batch[f"{role}_content_mask"]).bool())
        _assert_vectors([out[key][i][mask[i]].numpy() for i in range(len(records))], expected)

    criterion = LossFactory.create({"loss_type": "maxsim", "temperature": 0.05, "gather_across_workers": False})
    with torch.no_grad():
        loss = float(criterion(out, batch))
    scores = torch.tensor([[float(np.sum(np.max(q @ p.T, axis=1))) for p in positives] for q in queries])
    assert loss == pytest.approx(float(F.cross_entropy(scores / 0.05, torch.arange(len(records)))), rel=1e-4)


def test_vector_tokens_is_checked_where_it_means_something(tiny_bert_dir, tiny_qwen3_vl_dir):
    from vembed.config import ConfigError, as_config
    from vembed.model import EmbeddingModel

    with pytest.raises(ConfigError, match="vector_tokens=content .* applies to multi-vector models only"):
        as_config({"vector_tokens": "content"})
    with pytest.raises(ConfigError, match="a text model has no template: use vector_tokens: non_padding"):
        as_config({"vector_tokens": "content", "pooling_method": "none", "model_family": "text"})
    with pytest.raises(ValueError, match="this is a text model: use vector_tokens: non_padding"):
        EmbeddingModel.from_pretrained(str(tiny_bert_dir), pooling_method="none", vector_tokens="content")
    with pytest.raises(ConfigError, match="expects 'auto' | 'non_padding' | 'content'"):
        as_config({"vector_tokens": "template"})
    everything = EmbeddingModel.from_pretrained(
        str(tiny_qwen3_vl_dir), pooling_method="none", vector_tokens="non_padding"
    )
    assert everything.vector_tokens == "non_padding"
    assert EmbeddingModel.from_pretrained(str(tiny_qwen3_vl_dir), pooling_method="none").vector_tokens == "content"
    assert EmbeddingModel.from_pretrained(str(tiny_qwen3_vl_dir)).vector_tokens is None
