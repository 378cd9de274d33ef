"""One input, one vector: fixed-length padding for fixed-position poolers, and preprocessing settings that travel
with the checkpoint (issue 16, items 1 and 2). References are plain transformers, written out here."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from vembed.data.pipeline import PickledPreprocessor, collate_train_batch, preprocess_records
from vembed.data.processing import Preprocessor
from vembed.inference import VEmbedFactoryPredictor
from vembed.model import EmbeddingModel

pytestmark = pytest.mark.unit

SHORT = "a red circle"
LONG = "a large blue square on a white background next to a small green triangle and a yellow star"


def _siglip_reference(model_dir, texts):
    """SigLIP as released: ``padding="max_length"`` to 64 tokens, ``get_text_features`` on what the tokenizer
    returns (the tiny one's BertTokenizer gives a mask), L2-normalised."""
    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out, dim=-1).numpy()


def test_siglip_text_vectors_do_not_depend_on_the_batch(tiny_siglip_dir):
    predictor = VEmbedFactoryPredictor(tiny_siglip_dir, device="cpu")
    alone = predictor.encode_text(SHORT)
    batched = predictor.encode_text([SHORT, LONG])
    np.testing.assert_allclose(batched[0], alone, atol=1e-5)
    np.testing.assert_allclose(batched, _siglip_reference(tiny_siglip_dir, [SHORT, LONG]), atol=1e-5)
    assert predictor.preprocessor.text_padding == "max_length"


def test_siglip_tokenizer_without_a_mask_attends_to_its_padding(tiny_siglip_dir):
    """SigLIP's own tokenizer returns input_ids only (``model_input_names == ["input_ids"]``): the released model
    reads its 64 tokens, padding included, so vembed must not mask the padding either."""
    predictor = VEmbedFactoryPredictor(tiny_siglip_dir, device="cpu")
    predictor.preprocessor.tokenizer.model_input_names = ["input_ids"]
    model = AutoModel.from_pretrained(tiny_siglip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_siglip_dir)
    ids = tokenizer([SHORT, LONG], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids["input_ids"])
    reference = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1).numpy()
    np.testing.assert_allclose(predictor.encode_text([SHORT, LONG]), reference, atol=1e-5)


def test_siglip_training_rows_keep_their_fixed_length(tiny_siglip_dir, tmp_path):
    """The Ray Data task pads to max_text_length and the worker's collate trims shared padding, except for models
    whose pooling reads a fixed position: their training forward must see what the Predictor sees."""
    pre = Preprocessor.from_pretrained(tiny_siglip_dir)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (9, 99, 9)).save(image)
    table = pa.Table.from_pylist([{"query": SHORT, "positive": str(image)}, {"query": "a cat", "positive": str(image)}])
    rows = preprocess_records(
        table, preprocessor=PickledPreprocessor(pre), retrieval_mode="t2i", on_bad_record="fail", bad_records=None
    )
    batch = collate_train_batch(rows)
    assert batch["query_input_ids"].shape == (2, 64) and "text_fixed_length" not in batch
    model = EmbeddingModel.from_pretrained(tiny_siglip_dir).eval()
    with torch.no_grad():
        trained_view = model(**batch)["query"].numpy()
    np.testing.assert_allclose(trained_view, _siglip_reference(tiny_siglip_dir, [SHORT, "a cat"]), atol=1e-5)


def _mean_reference(model_dir, texts, max_length):
    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def test_checkpoint_keeps_the_trained_text_length(tiny_bert_dir, tmp_path):
    saved = EmbeddingModel.from_config({"model_name": str(tiny_bert_dir), "max_text_length": 6}).save_pretrained(
        tmp_path / "ckpt"
    )
    spec = json.loads((saved / "vembed.json").read_text())
    assert spec["preprocessing"]["max_text_length"] == 6 and spec["preprocessing"]["text_padding"] == "longest"
    predictor = VEmbedFactoryPredictor(saved, device="cpu")
    assert predictor.preprocessor.max_text_length == 6
    np.testing.assert_allclose(predictor.encode_text([LONG]), _mean_reference(tiny_bert_dir, [LONG], 6), atol=1e-5)
    # an explicit argument still overrides the saved value
    longer = VEmbedFactoryPredictor(saved, device="cpu", max_text_length=12)
    np.testing.assert_allclose(longer.encode_text([LONG]), _mean_reference(tiny_bert_dir, [LONG], 12), atol=1e-5)
    # and a reloaded-then-resaved model keeps it
    again = EmbeddingModel.from_pretrained(saved).save_pretrained(tmp_path / "again")
    assert json.loads((again / "vembed.json").read_text())["preprocessing"]["max_text_length"] == 6


def test_decoder_text_embedders_default_to_their_own_length_limit(tiny_qwen3_embedding_dir, tiny_bert_dir):
    assert Preprocessor.from_pretrained(tiny_qwen3_embedding_dir).max_text_length == 512  # its position table
    assert Preprocessor.from_pretrained(tiny_bert_dir).max_text_length == 77  # encoders keep 77
