"""The tiny model factory writes real HF directories that load offline through the hub-id code path."""

from __future__ import annotations

import os

import pytest
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

pytestmark = pytest.mark.unit


def test_offline_mode_is_on():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("fixture", ["tiny_clip_dir", "tiny_siglip_dir"])
def test_dual_encoders_load_with_auto_classes(request, fixture):
    path = request.getfixturevalue(fixture)
    model = AutoModel.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert hasattr(model, "get_text_features") and hasattr(model, "get_image_features")
    ids = processor.tokenizer(["a red circle on a white background"])["input_ids"][0]
    assert processor.tokenizer.unk_token_id not in ids[1:-1]
    assert (path / "model.safetensors").exists()


def test_text_encoder_loads_with_auto_classes(tiny_bert_dir):
    model = AutoModel.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = tokenizer("a small blue square", return_tensors="pt")
    assert model(**enc).last_hidden_state.shape[-1] == model.config.hidden_size


def test_image_encoder_loads_with_auto_classes(tiny_vit_dir):
    from PIL import Image

    model = AutoModel.from_pretrained(tiny_vit_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_vit_dir)
    pixels = processor(images=[Image.new("RGB", (50, 40), (200, 10, 10))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    assert model(pixel_values=pixels).last_hidden_state.shape[0] == 1
