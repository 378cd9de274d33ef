"""VLM preprocessing (Qwen3-VL-Embedding's format) against the official recipe, written out here independently.

The reference follows the released embedder step by step: a conversation with the instruction as system message
(a final "." added when it has no final punctuation) and the user's image(s) first then the text ("NULL" when
empty), ``apply_chat_template(add_generation_prompt=True)``, the image processor with
``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``, each ``<|image_pad|>`` repeated
``t*h*w / merge**2`` times, then the tokenizer with padding. vembed must give the same arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from vembed.data.processing import Preprocessor

pytestmark = pytest.mark.unit


def _image(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), colour)
    for x in range(0, width, 4):
        image.putpixel((x, x % height), (255 - colour[0], colour[1], 255 - colour[2]))
    return image


def _official(model_dir, items, instruction, min_pixels, max_pixels):
    """The official inputs of ``items`` [(text or None, [images])] built with plain transformers."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    image_pad_id = AutoConfig.from_pretrained(model_dir).image_token_id
    system = instruction.strip()
    if system[-1] not in ".!?;:,'\")]}":
        system += "."
    texts, flat = [], []
    for text, images in items:
        content = [{"type": "image"} for _ in images]
        if text:
            content.append({"type": "text", "text": text})
        if not text and not images:
            content.append({"type": "text", "text": "NULL"})
        messages = [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": content},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        flat.extend(images)
    vision = image_processor(
        images=flat, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="np"
    )
    grid = iter(vision["image_grid_thw"].tolist())
    expanded = []
    for text in texts:
        parts = text.split("<|image_pad|>")
        out = parts[0]
        for part in parts[1:]:
            t, h, w = next(grid)
            out += "<|image_pad|>" * (t * h * w // image_processor.merge_size**2) + part
        expanded.append(out)
    encoded = tokenizer(expanded, padding=True, return_tensors="np")
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": (encoded["input_ids"] == image_pad_id).astype(np.int64),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def test_conversations_match_the_official_format(tiny_qwen3_vl_dir):
    red, blue, wide = _image(32, 32, (200, 10, 10)), _image(48, 40, (10, 10, 200)), _image(96, 40, (10, 200, 10))
    items = [("a red circle", [red]), (None, [blue, wide]), ("only text here", []), (None, [])]
    pre = Preprocessor.from_pretrained(tiny_qwen3_vl_dir, image_min_pixels=64 * 64, image_max_pixels=96 * 96)
    for instruction, given in (
        ("Represent the user's input.", None),
        ("Find the matching image", "Find the matching image"),
    ):
        got = pre.process_conversations([t for t, _ in items], [ims for _, ims in items], instruction=given)
        want = _official(tiny_qwen3_vl_dir, items, instruction, 64 * 64, 96 * 96)
        assert sorted(got) == sorted([*want, "content_mask"])  # content_mask: tests/test_multivector_vlm.py
        for key, value in want.items():
            assert got[key].dtype == value.dtype or key == "pixel_values", key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    counts = got["mm_token_type_ids"].sum(axis=1).tolist()
    assert counts[0] == 4 and counts[1] > 8 and counts[2] == counts[3] == 0  # 32 px -> 64x64 px -> 4 tokens


def test_pixel_bounds_change_the_image_grid(tiny_qwen3_vl_dir):
    image = _image(64, 64, (90, 90, 10))
    small = Preprocessor.from_pretrained(tiny_qwen3_vl_dir)  # processor's own: 64*64 .. 128*128
    large = Preprocessor.from_pretrained(tiny_qwen3_vl_dir, image_min_pixels=128 * 128, image_max_pixels=256 * 256)
    assert small.process_conversations(["x"], [image])["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert large.process_conversations(["x"], [image])["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_truncation_keeps_the_template_end_and_every_image_token(tiny_qwen3_vl_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir)
    long_text = "a large blue square on a white background " * 6
    full = _official(
        tiny_qwen3_vl_dir, [(long_text, [_image(32, 32, (1, 2, 3))])], "Represent the user's input.", 64 * 64, 128 * 128
    )
    length = int(full["attention_mask"].sum())
    limit = length - 20
    pre = Preprocessor.from_pretrained(tiny_qwen3_vl_dir, max_text_length=limit)
    got = pre.process_conversations([long_text], [_image(32, 32, (1, 2, 3))])
    ids = got["input_ids"][0].tolist()
    assert len(ids) == limit
    # reference: the official sequence with 20 tokens of the text removed from its end (the text's tokens are the
    # ones just before "<|im_end|>\n<|im_start|>assistant\n", the last 5 tokens of the sequence)
    tail = tokenizer("<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    official = full["input_ids"][0].tolist()
    assert official[-len(tail) :] == tail and ids[-len(tail) :] == tail
    assert ids == official[: -len(tail) - 20] + tail
    assert int(got["mm_token_type_ids"].sum()) == 4
    assert tokenizer.decode(ids).startswith(tokenizer.decode(official[: -len(tail) - 20]))


def test_image_tokens_over_the_limit_are_a_clear_error(tiny_qwen3_vl_dir):
    pre = Preprocessor.from_pretrained(tiny_qwen3_vl_dir, max_text_length=62)
    with pytest.raises(
        ValueError, match=r"item #1: its 16 image tokens .* exceed max_text_length=62.*image_max_pixels"
    ):
        pre.process_conversations(["short", "big"], [None, [_image(32, 32, (5, 5, 5))] * 4])


def test_vlm_directory_without_its_processor_files_is_a_clear_error(tiny_qwen3_vl_dir, tmp_path):
    import shutil

    broken = tmp_path / "no_processor"
    shutil.copytree(tiny_qwen3_vl_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "processor_config.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"vision-language model but lacks its processor files.*preprocessor_config"
    ):
        Preprocessor.from_pretrained(broken)


def test_instruction_for_a_model_without_instructions_is_a_clear_error(tiny_bert_dir):
    pre = Preprocessor.from_pretrained(tiny_bert_dir)
    with pytest.raises(ValueError, match=r"this model takes no instruction \(got instruction='Find'\)"):
        pre.process_texts(["a cat"], instruction="Find")
