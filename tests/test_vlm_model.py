"""The vlm family (Qwen3-VL): detected from the config, one forward per item, equal to plain transformers.

The reference (tests/vlm_reference.py) is the official recipe written out with plain ``transformers``: chat-template
input, ``AutoModel`` forward, last non-padding token, L2 norm. The seed project's bug -- every input got the same
vector (token 0 under causal attention sees only itself) -- would make all vectors equal: the distinctness check
below demands a clear distance between every pair of different items.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vlm_reference import official_embeddings, official_inputs

from vembed.model import EmbeddingModel, detect_family
from vembed.testing.synthetic import ShapeSpec, draw_shape
from vembed.training.model_builder import build_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def images():
    rng = random.Random(0)
    return [
        draw_shape(ShapeSpec("red", "circle", "white", "large"), 32, rng),
        draw_shape(ShapeSpec("blue", "square", "black", "small"), 96, rng),  # 3x3 merged grid: more image tokens
    ]


@pytest.fixture(scope="module")
def items(images):
    """Text, image and image+text items of different lengths (a short one padded beside longer ones)."""
    texts = ["a red circle", None, "a large blue square on a white background", None, "make it blue", None]
    pictures = [None, images[0], None, images[1], images[0], None]  # the last item is the "NULL" text
    return texts, pictures


@pytest.fixture(scope="module")
def model(tiny_qwen3_vl_dir):
    return EmbeddingModel.from_pretrained(str(tiny_qwen3_vl_dir)).eval()


def _encode(model, inputs, **kwargs):
    with torch.no_grad():
        return model.encode(**inputs, **kwargs).numpy()


def test_vlm_family_is_detected_from_the_config_and_loads(tiny_qwen3_vl_dir, tmp_path):
    assert detect_family(str(tiny_qwen3_vl_dir)) == "vlm"
    model = build_model({"model_name": str(tiny_qwen3_vl_dir)})  # raised AttributeError 'hidden_size' before
    assert model.family == "vlm" and model.embedding_dim == 64  # text_config.hidden_size
    assert model.pooling == {"text": "last", "image": "last"}
    assert model.encoder.max_text_tokens() == 512  # text_config.max_position_embeddings
    assert {"Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"} <= set(model.no_split_module_classes())
    # the id's spelling plays no part: the same files under a "clip"-looking name are still a vlm
    renamed = tmp_path / "openai-clip-vit-base-patch32"
    renamed.symlink_to(tiny_qwen3_vl_dir, target_is_directory=True)
    assert detect_family(str(renamed)) == "vlm"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_vectors_equal_the_official_reference_for_text_image_and_both(model, tiny_qwen3_vl_dir, items, padding_side):
    texts, pictures = items
    inputs = official_inputs(tiny_qwen3_vl_dir, texts, pictures, padding_side=padding_side)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 6], [1, 4, 4]]
    got = _encode(model, inputs)
    assert got.shape == (6, 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    if padding_side == "right":  # plain transformers' own positions agree with ours for right padding
        np.testing.assert_allclose(got, official_embeddings(tiny_qwen3_vl_dir, inputs), atol=1e-4, rtol=0)
    # each item alone (no padding at all) == the official embedding of that item == its row in the padded batch
    for i, (text, picture) in enumerate(zip(texts, pictures, strict=True)):
        alone = official_inputs(tiny_qwen3_vl_dir, [text], [picture])
        reference = official_embeddings(tiny_qwen3_vl_dir, alone)[0]
        np.testing.assert_allclose(_encode(model, alone)[0], reference, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[i], reference, atol=1e-4, rtol=0, err_msg=f"item {i} ({padding_side} pad)")


def test_different_items_get_clearly_different_vectors(model, tiny_qwen3_vl_dir, items):
    texts, pictures = items
    got = _encode(model, official_inputs(tiny_qwen3_vl_dir, texts, pictures))
    distances = np.linalg.norm(got[:, None] - got[None], axis=-1)[np.triu_indices(len(got), k=1)]
    # first-token pooling (the seed bug) gives distances ~1e-7; a random tiny model separates these by > 0.1
    assert distances.min() > 0.05, distances
    # a mixed item is one sequence, not the sum of its text and image vectors
    text_only, image_only, both = got[0], got[1], got[4]
    assert not np.allclose(both, F.normalize(torch.tensor(text_only + image_only), dim=0).numpy(), atol=1e-3)


def test_matryoshka_and_projection_head(tiny_qwen3_vl_dir, items):
    texts, pictures = items
    inputs = official_inputs(tiny_qwen3_vl_dir, texts, pictures)
    reference = torch.tensor(official_embeddings(tiny_qwen3_vl_dir, inputs))
    model = EmbeddingModel.from_pretrained(str(tiny_qwen3_vl_dir)).eval()
    truncated = _encode(model, inputs, dim=16)
    np.testing.assert_allclose(truncated, F.normalize(reference[:, :16], dim=-1).numpy(), atol=1e-4, rtol=0)

    torch.manual_seed(0)
    projected = EmbeddingModel.from_pretrained(str(tiny_qwen3_vl_dir), projection_dim=24).eval()
    assert list(projected.heads) == ["sequence"]  # one head: text, image and mixed items share one space
    head = projected.heads["sequence"].weight.detach()
    with torch.no_grad():
        states = projected.encoder.encode_sequence(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["mm_token_type_ids"],
            inputs["pixel_values"],
            inputs["image_grid_thw"],
        )[0]
    np.testing.assert_allclose(_encode(projected, inputs), F.normalize(states @ head.T, dim=-1).numpy(), atol=1e-5)


def test_forward_embeds_each_role_with_the_vlm_keys(model, tiny_qwen3_vl_dir, images):
    queries = official_inputs(tiny_qwen3_vl_dir, ["a red circle", "a small blue square"], [None, None])
    positives = official_inputs(tiny_qwen3_vl_dir, [None, None], images)
    negatives = official_inputs(tiny_qwen3_vl_dir, [None] * 4, [images[1], images[0], images[0], images[1]])
    batch = {f"query_{k}": v for k, v in queries.items()}
    batch |= {f"positive_{k}": v for k, v in positives.items()}
    batch |= {
        f"negative_{k}": v.reshape(2, 2, -1) if v.dim() == 2 and k != "pixel_values" and k != "image_grid_thw" else v
        for k, v in negatives.items()
    }
    batch["labels"] = torch.tensor([0, 1])
    with torch.no_grad():
        out = model(**batch)
    assert out["query"].shape == (2, 64) and out["positive"].shape == (2, 64) and out["negatives"].shape == (2, 2, 64)
    np.testing.assert_allclose(out["query"].numpy(), _encode(model, queries), atol=1e-5)
    np.testing.assert_allclose(out["positive"].numpy(), _encode(model, positives), atol=1e-5)
    np.testing.assert_allclose(out["negatives"].reshape(4, -1).numpy(), _encode(model, negatives), atol=1e-5)


def test_bad_vlm_batches_are_clear_errors(model, tiny_qwen3_vl_dir, images):
    inputs = official_inputs(tiny_qwen3_vl_dir, ["a red circle"], [images[0]])
    with pytest.raises(ValueError, match=r"flat patches"):
        model.encode(**{**inputs, "pixel_values": torch.zeros(1, 3, 32, 32)})
    with pytest.raises(ValueError, match=r"hold 4 image tokens but image_grid_thw needs 9"):
        model.encode(**{**inputs, "image_grid_thw": torch.tensor([[1, 6, 6]]), "pixel_values": torch.zeros(36, 1536)})
    with pytest.raises(ValueError, match=r"no pixel_values"):
        model.encode(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match=r"inside a conversation sequence"):
        model.encode_image(inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"query_pixel_values and query_image_grid_thw go together"):
        model(query_input_ids=inputs["input_ids"], query_pixel_values=inputs["pixel_values"])
