"""The official Qwen3-VL-Embedding input and embedding, written out independently of vembed (test-only).

Input: a conversation whose system message is the instruction and whose user message holds the image(s) first, then
the text ("NULL" when neither), rendered with the tokenizer's chat template and ``add_generation_prompt=True``; each
``<|image_pad|>`` expanded to ``t*h*w / merge**2`` copies (what ``Qwen3VLProcessor`` does), ``mm_token_type_ids`` 1 on
image tokens. Embedding: plain ``AutoModel`` forward, hidden state of the last non-padding token, L2-normalised.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

DEFAULT_INSTRUCTION = "Represent the user's input."


def patterned_images(sizes: Sequence[tuple[int, int]]) -> list[Image.Image]:
    """Test images of the given (width, height): red, then blue, ..., each with a yellow dotted diagonal."""
    colours = ((200, 20, 20), (20, 20, 200), (20, 160, 20))
    out = []
    for i, size in enumerate(sizes):
        image = Image.new("RGB", size, colours[i % len(colours)])
        for x in range(0, size[0], 3):
            image.putpixel((x, (x * (i + 2)) % size[1]), (255, 255, 0))
        out.append(image)
    return out


@functools.lru_cache(maxsize=4)
def _loaded(model_dir: str, what: str):
    loader = {"tokenizer": AutoTokenizer, "images": AutoImageProcessor, "model": AutoModel}[what]
    loaded = loader.from_pretrained(model_dir)
    return loaded.eval() if what == "model" else loaded


def official_inputs(
    model_dir,
    texts: Sequence[str | None],
    images: Sequence[Image.Image | None],
    instruction: str = DEFAULT_INSTRUCTION,
    padding_side: str | None = None,
) -> dict[str, torch.Tensor]:
    tokenizer = _loaded(str(model_dir), "tokenizer")
    processor = _loaded(str(model_dir), "images")
    rendered, pil = [], []
    for text, image in zip(texts, images, strict=True):
        content = []
        if image is not None:
            content.append({"type": "image"})
            pil.append(image)
        if text is not None:
            content.append({"type": "text", "text": text})
        if not content:
            content.append({"type": "text", "text": "NULL"})
        messages = [
            {"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": content},
        ]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    out: dict[str, torch.Tensor] = {}
    if pil:
        vision = processor(images=pil, return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
        counts = iter((vision["image_grid_thw"].prod(-1) // processor.merge_size**2).tolist())
        expanded = []
        for text in rendered:
            parts = text.split("<|image_pad|>")
            expanded.append(parts[0] + "".join("<|image_pad|>" * next(counts) + p for p in parts[1:]))
        rendered = expanded
    side = tokenizer.padding_side
    tokenizer.padding_side = padding_side or side
    try:
        enc = tokenizer(rendered, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out.update(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        mm_token_type_ids=(enc["input_ids"] == image_token).long(),
    )
    return out


def official_embeddings(model_dir, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    model = _loaded(str(model_dir), "model")
    with torch.no_grad():
        states = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"]
    length = mask.shape[1]
    last = length - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)  # last real token, either padding side
    return F.normalize(states[torch.arange(states.shape[0]), last], dim=-1).numpy()
