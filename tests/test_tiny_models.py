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


def test_tiny_qwen3_vl_loads_like_the_released_checkpoint(tiny_qwen3_vl_dir):
    import json

    import torch
    from PIL import Image

    config = json.loads((tiny_qwen3_vl_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    model = AutoModel.from_pretrained(tiny_qwen3_vl_dir)
    assert type(model).__name__ == "Qwen3VLModel"
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir)
    images = AutoImageProcessor.from_pretrained(tiny_qwen3_vl_dir)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Represent the user's input."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red circle"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|vision_start|><|image_pad|><|vision_end|>a red" in text
    pixels = images(images=[Image.new("RGB", (32, 32), (200, 10, 10))], return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64x64 pixels after the min-pixel bound
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * 4)  # t*h*w / merge**2
    ids = tokenizer([expanded], return_tensors="pt")["input_ids"]
    image_tokens = (ids == model.config.image_token_id).long()
    assert int(image_tokens.sum()) == 4
    with torch.no_grad():
        out = model(input_ids=ids, **pixels, mm_token_type_ids=image_tokens)
    assert out.last_hidden_state.shape == (1, ids.shape[1], 64)


def test_tiny_qwen3_embedding_pads_left_and_ends_with_endoftext(tiny_qwen3_embedding_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_embedding_dir)
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["a red circle", "a large blue square on a white background"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][1][0] == 1
    assert all(row[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>") for row in batch["input_ids"])
    assert type(AutoModel.from_pretrained(tiny_qwen3_embedding_dir)).__name__ == "Qwen3Model"
