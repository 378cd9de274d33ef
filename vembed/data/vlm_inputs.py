"""Vision-language embedder inputs (Qwen3-VL-Embedding's official format), built without ``AutoProcessor``.

One item is one sequence: a conversation whose system message is the instruction and whose user message holds the
item's image(s) first and then its text (an item with neither is the text ``"NULL"``), rendered with the model's
chat template and ``add_generation_prompt=True``. Images go through the model's own image processor
(``Qwen2VLImageProcessor``: flat patches ``[sum(t*h*w), C]`` and ``image_grid_thw``), and each ``<|image_pad|>``
of the rendered text is expanded to ``t*h*w / merge_size**2`` pads, as ``Qwen3VLProcessor`` does;
``mm_token_type_ids`` marks the image tokens (1) for ``Qwen3VLModel.forward``.

``content_mask`` marks the item's *content* tokens (1): the image tokens and the tokens of the user's text (every
token that covers a character of it), not the instruction, the chat-template tokens (``<|im_start|>``, role names,
``<|vision_start|>``...) or padding. A multi-vector model with ``vector_tokens: content`` (ColQwen-style) keeps
exactly these tokens as an item's vectors, in training, the Predictor, batch embedding and Serve alike. The text's
place in the rendered string is found by rendering the conversation a second time with a placeholder text: the
template must insert the text as it is (a ValueError says so otherwise).

Why not the processor itself: ``Qwen3VLProcessor`` cannot be constructed on a stack without torchvision (its video
processor needs it), so vembed does the processor's two text steps (expansion, token types) here from the tokenizer
and the image processor, which every Qwen3-VL checkpoint ships.

Truncation keeps what the model needs: a sequence longer than ``max_length`` loses tokens from the end of the
item's *text* only, so the template's end (``<|im_end|>\\n<|im_start|>assistant\\n``, whose last token is the one
pooled) and every image token survive; when the template and image tokens alone exceed the limit, a ValueError says
so. A sequence that fits is tokenised exactly as the official processor does (the whole rendered string at once).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

#: the instruction of Qwen3-VL-Embedding when none is given
DEFAULT_VLM_INSTRUCTION = "Represent the user's input."
#: the text of an item with neither text nor image
EMPTY_ITEM_TEXT = "NULL"
IMAGE_PAD = "<|image_pad|>"
#: the placeholder text that locates an item's text in its rendered conversation (never a real item's text)
_TEXT_PLACEHOLDER = "\x00vembed-item-text\x00"


def format_instruction(instruction: str | None, default: str = DEFAULT_VLM_INSTRUCTION) -> str:
    """The system message for ``instruction``: stripped, ``default`` when empty, a final "." added when it does not
    end in punctuation (the official embedder's rule)."""
    text = (instruction or "").strip()
    if not text:
        return default
    if not unicodedata.category(text[-1]).startswith("P"):
        text += "."
    return text


def conversation(text: str | None, num_images: int, instruction: str) -> list[dict[str, Any]]:
    """The chat messages of one item: system = ``instruction``; user = ``num_images`` images, then ``text``."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    if text:
        content.append({"type": "text", "text": text})
    if not content:
        content.append({"type": "text", "text": EMPTY_ITEM_TEXT})
    return [
        {"role": "system", "content": [{"type": "text", "text": instruction}]},
        {"role": "user", "content": content},
    ]


def _as_image_list(value: Any, index: int) -> list[Image.Image]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for j, image in enumerate(items):
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"item #{index} image #{j} is a {type(image).__name__}, expected a PIL image "
                "(decode paths and bytes with vembed.data.images.load_image first)"
            )
    return [image if image.mode == "RGB" else image.convert("RGB") for image in items]


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, return_attention_mask=False, return_token_type_ids=False)["input_ids"])


def _render(tokenizer: Any, text: str | None, num_images: int, instruction: str, index: int) -> tuple[str, str, str]:
    """One item's rendered conversation split around its user text: ``(head, text, tail)``, ``head + text + tail``
    being exactly the chat template's rendering (``text`` is empty for an image-only item)."""

    def render(value: str | None) -> str:
        return tokenizer.apply_chat_template(
            conversation(value, num_images, instruction), tokenize=False, add_generation_prompt=True
        )

    rendered = render(text)
    user_text = text or (EMPTY_ITEM_TEXT if num_images == 0 else "")
    if not user_text:
        return rendered, "", ""
    pieces = render(_TEXT_PLACEHOLDER).split(_TEXT_PLACEHOLDER)
    if len(pieces) != 2 or pieces[0] + user_text + pieces[1] != rendered:
        raise ValueError(
            f"item #{index}: the model's chat template does not insert the item's text as it is, so its content "
            "tokens cannot be located; use a chat template that renders text parts verbatim (as Qwen3-VL's does)"
        )
    return pieces[0], user_text, pieces[1]


def _fit(
    tokenizer: Any, head: str, text: str, tail: str, max_length: int, image_tokens: int, index: int
) -> tuple[list[int], list[int]]:
    """Token ids of one rendered item ``head + text + tail`` and, per token, 1 where it covers a character of
    ``text``; only the text is truncated when the whole exceeds ``max_length``."""
    encoded = tokenizer(
        head + text + tail, return_attention_mask=False, return_token_type_ids=False, return_offsets_mapping=True
    )
    ids, start, end = list(encoded["input_ids"]), len(head), len(head) + len(text)
    if len(ids) <= max_length:
        in_text = [int(a < end and b > start) for a, b in encoded["offset_mapping"]]
        return ids, in_text
    head_ids = _tokens(tokenizer, head) if text else ids
    text_ids = _tokens(tokenizer, text) if text else []
    tail_ids = _tokens(tokenizer, tail) if tail else []
    fixed = len(head_ids) + len(tail_ids)
    if fixed > max_length:
        raise ValueError(
            f"item #{index}: its {image_tokens} image tokens and {fixed - image_tokens} template tokens alone "
            f"exceed max_text_length={max_length}; raise max_text_length or lower image_max_pixels so that each "
            "image gives fewer tokens"
        )
    kept = text_ids[: max_length - fixed]
    return head_ids + kept + tail_ids, [0] * len(head_ids) + [1] * len(kept) + [0] * len(tail_ids)


def process_conversations(
    tokenizer: Any,
    image_processor: Any | None,
    texts: Sequence[str | None] | None,
    images: Sequence[Any] | None,
    instruction: str,
    *,
    max_length: int,
    image_token_id: int,
    image_size: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """The batch-format arrays of a vision-language embedder for items ``(texts[i], images[i])``.

    Args:
        tokenizer: the model's tokenizer, carrying its chat template.
        image_processor: the model's image processor (``merge_size``), or None for text-only batches.
        texts: one text (or None) per item; None means no text in any item.
        images: one PIL image, list of PIL images or None per item; None means no image in any item.
        instruction: the system message (already formatted, see :func:`format_instruction`).
        max_length: most tokens per item (see the module doc for what truncation keeps).
        image_token_id: the id of ``<|image_pad|>`` in the model's config.
        image_size: ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``; None keeps the processor's own.

    Returns:
        ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``content_mask`` int64 ``[B, L]`` (padded on the
        tokenizer's side with its pad token; ``content_mask`` is 1 on the item's image and text tokens, see the
        module doc), plus ``pixel_values`` float32 ``[sum P_i, C]`` and ``image_grid_thw`` int64
        ``[N_images, 3]`` when any item has an image.

    Raises:
        ValueError: an empty batch, texts and images of different lengths, an image without an image processor,
            or an item whose image and template tokens alone exceed ``max_length``.
    """
    size = len(texts) if texts is not None else len(images) if images is not None else 0
    if size == 0:
        raise ValueError("process_conversations got an empty batch: give at least one text or image")
    if texts is not None and images is not None and len(texts) != len(images):
        raise ValueError(f"process_conversations got {len(texts)} texts but {len(images)} image entries")
    text_list = list(texts) if texts is not None else [None] * size
    for i, text in enumerate(text_list):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text #{i} is a {type(text).__name__}, expected str or None")
    image_lists = [_as_image_list(v, i) for i, v in enumerate(images)] if images is not None else [[]] * size
    flat = [image for per_item in image_lists for image in per_item]
    out: dict[str, np.ndarray] = {}
    pads: list[int] = []
    if flat:
        if image_processor is None:
            raise ValueError("this model has no image processor; it cannot encode images")
        kwargs = {"size": dict(image_size)} if image_size else {}
        processed = image_processor(images=flat, return_tensors="np", **kwargs)
        grid = np.asarray(processed["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
        merge = int(getattr(image_processor, "merge_size", 1))
        pads = [int(np.prod(thw)) // (merge * merge) for thw in grid]
        out["pixel_values"] = np.ascontiguousarray(processed["pixel_values"], dtype=np.float32)
        out["image_grid_thw"] = grid
    rows: list[list[int]] = []
    text_flags: list[list[int]] = []
    next_image = 0
    for i, (text, per_item) in enumerate(zip(text_list, image_lists, strict=True)):
        head, user_text, tail = _render(tokenizer, text, len(per_item), instruction, i)
        pieces = head.split(IMAGE_PAD)
        if len(pieces) - 1 != len(per_item) or IMAGE_PAD in user_text + tail:
            found = (head + user_text + tail).count(IMAGE_PAD)
            raise ValueError(
                f"item #{i}: the chat template rendered {found} {IMAGE_PAD} for {len(per_item)} images; "
                "the model's chat template does not place images as Qwen3-VL's does"
            )
        counts = pads[next_image : next_image + len(per_item)]
        next_image += len(per_item)
        expanded = pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:], strict=True))
        ids, in_text = _fit(tokenizer, expanded, user_text, tail, max_length, sum(counts), i)
        rows.append(ids)
        text_flags.append(in_text)
    length = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    ids = np.full((size, length), pad_id, dtype=np.int64)
    mask = np.zeros((size, length), dtype=np.int64)
    in_text = np.zeros((size, length), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = row
        mask[i, span] = 1
        in_text[i, span] = text_flags[i]
    out["input_ids"] = ids
    out["attention_mask"] = mask
    image = (ids == image_token_id) & (mask == 1)
    out["mm_token_type_ids"] = image.astype(np.int64)
    out["content_mask"] = (image | (in_text == 1)).astype(np.int64)
    return out
