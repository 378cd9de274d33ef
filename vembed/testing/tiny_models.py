"""Tiny but real Hugging Face model directories, built from configs with no network.

Each ``make_tiny_*`` writes ``config.json`` + ``model.safetensors`` + real tokenizer / image-processor files to a
directory, so the directory loads through exactly the ``from_pretrained(path)`` call a hub id takes. Tokenizers are
trained offline with the ``tokenizers`` library on the vocabulary of the synthetic shapes data set (plus bytes, so
any text tokenises).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

from vembed.testing.synthetic import caption_corpus

IMAGE_SIZE = 32
HIDDEN = 32


def _train_clip_bpe(vocab_size: int = 400) -> CLIPTokenizer:
    """A byte-level BPE in CLIP's own format (``</w>`` word ends), trained on the caption corpus."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(caption_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(vocab=state["vocab"], merges=merges)


def _train_wordpiece(vocab_size: int = 300) -> BertTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] ... [SEP], [PAD]=0) trained on the caption corpus."""
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(
        caption_corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    )
    cls_id, sep_id = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(
        tokenizer_object=wp,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=128,
    )


def _tower(hidden: int) -> dict[str, int]:
    """The size of every tiny transformer: 2 layers, 2 heads, width ``hidden``."""
    return dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=2)


def _vision_tower(hidden: int, image_size: int) -> dict[str, int]:
    """A tiny ViT tower: :func:`_tower` over 8-pixel patches."""
    return dict(_tower(hidden), image_size=image_size, patch_size=8)


def _save(model: torch.nn.Module, processor, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def make_tiny_clip(path: str | Path, seed: int = 0, hidden: int = HIDDEN, image_size: int = IMAGE_SIZE) -> Path:
    """A 2-layer CLIP (text + vision towers, projection ``hidden``) with a real BPE tokenizer."""
    torch.manual_seed(seed)
    tokenizer = _train_clip_bpe()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            **_tower(hidden),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=_vision_tower(hidden, image_size),
        projection_dim=hidden,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return _save(CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer), path)


def make_tiny_siglip(path: str | Path, seed: int = 0, hidden: int = HIDDEN, image_size: int = IMAGE_SIZE) -> Path:
    """A 2-layer SigLIP with a WordPiece tokenizer (SigLIP's SentencePiece needs files we cannot download)."""
    torch.manual_seed(seed)
    tokenizer = _train_wordpiece()
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            **_tower(hidden),
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=_vision_tower(hidden, image_size),
    )
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return _save(SiglipModel(config), SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer), path)


def make_tiny_bert(path: str | Path, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """A 2-layer BERT-like text encoder with a WordPiece tokenizer."""
    torch.manual_seed(seed)
    tokenizer = _train_wordpiece()
    config = BertConfig(
        vocab_size=len(tokenizer),
        **_tower(hidden),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(BertModel(config), tokenizer, path)


def make_tiny_vit(path: str | Path, seed: int = 0, hidden: int = HIDDEN, image_size: int = IMAGE_SIZE) -> Path:
    """A 2-layer ViT-like image encoder with its image processor."""
    torch.manual_seed(seed)
    config = ViTConfig(**_vision_tower(hidden, image_size))
    processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    return _save(ViTModel(config), processor, path)
