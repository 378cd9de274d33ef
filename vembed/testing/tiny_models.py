"""Tiny but real Hugging Face model directories, built from configs with no network.

Each ``make_tiny_*`` writes ``config.json`` + ``model.safetensors`` + real tokenizer / image-processor files to a
directory, so the directory loads through exactly the ``from_pretrained(path)`` call a hub id takes. Tokenizers are
built offline from the vocabulary of the synthetic shapes data set (plus bytes or characters, so any text
tokenises), deterministically: the same files on every run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
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


def _learn_bpe_merges(words: Counter[tuple[str, ...]], max_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from word counts: the most frequent adjacent pair first, ties broken by the pair
    itself. (The ``tokenizers`` trainers break ties in hash-map order, which changes from run to run, and with it
    every token id of a model built on the tokenizer.)"""
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            merged[_apply_merge(word, best)] += count
        words = merged
    return merges


def _apply_merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _train_clip_bpe(vocab_size: int = 400) -> CLIPTokenizer:
    """A byte-level BPE in CLIP's own format (``</w>`` word ends), learned from the caption corpus as CLIP's
    tokenizer splits it into words."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    splitter = CLIPTokenizer(vocab={token: i for i, token in enumerate(alphabet)}, merges=[]).backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for text in caption_corpus():
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    symbols = alphabet + sorted({word[-1] for word in words})
    merges = _learn_bpe_merges(words, vocab_size - len(symbols))
    vocab = {token: i for i, token in enumerate(symbols + [a + b for a, b in merges])}
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _train_wordpiece() -> BertTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] ... [SEP], [PAD]=0) whose vocabulary is every character (alone and
    as a ``##`` continuation) and every whole word of the caption corpus, in sorted order (deterministic ids)."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus_words = {
        word for text in caption_corpus() for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    }
    characters = sorted({char for word in corpus_words for char in word})
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = special + characters + [f"##{c}" for c in characters] + sorted(corpus_words - set(characters))
    wp = Tokenizer(models.WordPiece({token: i for i, token in enumerate(tokens)}, unk_token="[UNK]"))
    wp.normalizer = normalizer
    wp.pre_tokenizer = pre_tokenizer
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
