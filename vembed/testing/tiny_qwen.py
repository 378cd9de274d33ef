"""Tiny Qwen3-VL and Qwen3 text-embedder directories, built from configs with no network.

They stand in for ``Qwen/Qwen3-VL-Embedding-2B`` and ``Qwen/Qwen3-Embedding-0.6B`` in tests: same model classes,
same file layout (``config.json`` with ``architectures``, safetensors weights, a byte-level ``Qwen2Tokenizer`` with
the Qwen special tokens and a chat template, and for the VLM a ``Qwen2VLImageProcessor`` and the
``processor_config.json`` of a ``Qwen3VLProcessor``),
so they load through exactly the ``from_pretrained(path)`` calls a hub id takes. Deterministic: the same files on
every run for the same seed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from tokenizers import pre_tokenizers, processors
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    Qwen3Model,
    Qwen3VLConfig,
    Qwen3VLModel,
)

from vembed.testing.synthetic import caption_corpus
from vembed.testing.tiny_models import _learn_bpe_merges

#: the Qwen special tokens, in the order the real vocabularies number them after the byte-level BPE
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: a chat template with the structure of Qwen3-VL's: one ``<|im_start|>role\n...<|im_end|>\n`` block per message;
#: list contents render images/videos as ``<|vision_start|><|image_pad|><|vision_end|>`` in place, texts as is.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

#: pixel bounds of the tiny VLM's image processor: a 32-pixel synthetic image is resized to 64x64 pixels,
#: 4x4 patches of 16 pixels, merged 2x2 into 4 image tokens
TINY_MIN_PIXELS = 64 * 64
TINY_MAX_PIXELS = 128 * 128


def _qwen_tokenizer(vocab_size: int = 600, padding_side: str = "right", append_eos: bool = False) -> Qwen2Tokenizer:
    """A byte-level BPE in Qwen2's format, learned from the caption corpus, plus the Qwen special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    splitter = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]).backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for text in caption_corpus():
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(text):
            words[tuple(word)] += 1
    merges = _learn_bpe_merges(words, vocab_size - len(alphabet))
    vocab = {token: i for i, token in enumerate(alphabet + [a + b for a, b in merges])}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        padding_side=padding_side,
        extra_special_tokens={},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    if append_eos:  # Qwen3-Embedding's tokenizer ends every text with <|endoftext|>
        eos = tokenizer.eos_token
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_token_id)]
        )
    return tokenizer


def _text_tower(vocab_size: int, pad_token_id: int, rope_parameters: dict) -> dict:
    """The tiny decoder: 2 layers, 64 wide, 4 query heads of 16, 2 key/value heads."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=pad_token_id,
        rope_parameters=rope_parameters,
        tie_word_embeddings=False,
    )


def _save_model(model: torch.nn.Module, path: Path, architecture: str) -> None:
    """Save the base model's weights under the ``architectures`` entry the released checkpoint carries
    (``save_pretrained`` would write the base class's own name)."""
    model.save_pretrained(path, safe_serialization=True)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = [architecture]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_tiny_qwen3_vl(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Qwen3-VL (2 vision blocks, patch 16, merge 2) saved like Qwen3-VL-Embedding.

    ``config.json`` says ``Qwen3VLForConditionalGeneration`` as the real checkpoint does; ``AutoModel`` gives
    ``Qwen3VLModel``. The processor renders conversations with a chat template and expands each image to
    ``t*h*w/4`` ``<|image_pad|>`` tokens.
    """
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config=_text_tower(
            len(tokenizer),
            ids["<|endoftext|>"],
            {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen3VLModel(config)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _save_model(model, path, "Qwen3VLForConditionalGeneration")
    # what Qwen3VLProcessor.save_pretrained writes, written part by part: constructing the processor itself needs
    # torchvision (for its video processor), which this CPU stack cannot install
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2) + "\n")
    return path


def make_tiny_qwen3_embedding(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Qwen3 decoder saved like Qwen3-Embedding: ``Qwen3ForCausalLM`` in ``config.json``
    (``AutoModel`` gives ``Qwen3Model``), a tokenizer that pads on the left and appends ``<|endoftext|>``."""
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer(padding_side="left", append_eos=True)
    config = Qwen3Config(
        **_text_tower(len(tokenizer), tokenizer.pad_token_id, {"rope_type": "default", "rope_theta": 10000.0}),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen3Model(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _save_model(model, path, "Qwen3ForCausalLM")
    tokenizer.save_pretrained(path)
    return path
