"""LoRA: what trains, per-architecture default targets, merged and adapter saves that reload to equal embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from vembed.model import EmbeddingModel
from vembed.model.lora import apply_lora, default_target_modules, is_lora
from vembed.training import model_builder

pytestmark = pytest.mark.unit

LORA = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def _perturb_adapters(model: EmbeddingModel, seed: int = 0) -> None:
    """Give the adapters non-zero weights (PEFT starts lora_B at zero, where merged == base trivially)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _text_and_pixels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 10, 11, 12, 1], [0, 20, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return ids, mask, pixels


def _embeddings(model: EmbeddingModel) -> dict[str, torch.Tensor]:
    ids, mask, pixels = _text_and_pixels()
    model.eval()
    with torch.no_grad():
        out = {}
        if "text" in model.modalities:
            out["text"] = model.encode_text(ids, mask)
        if "image" in model.modalities:
            out["image"] = model.encode_image(pixels)
        return out


def test_default_targets_follow_the_module_names(tiny_clip_dir, tiny_bert_dir, tiny_vit_dir):
    assert default_target_modules(AutoModel.from_pretrained(tiny_clip_dir)) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
    ]
    assert default_target_modules(AutoModel.from_pretrained(tiny_bert_dir)) == ["query", "key", "value"]
    vit_names = default_target_modules(AutoModel.from_pretrained(tiny_vit_dir))
    assert vit_names in (["q_proj", "k_proj", "v_proj", "o_proj"], ["query", "key", "value"])
    with pytest.raises(ValueError, match="no default LoRA target modules"):
        default_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_only_adapters_and_heads_train(tiny_clip_dir):
    model = EmbeddingModel.from_pretrained(tiny_clip_dir, projection_dim=8)
    apply_lora(model, LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable)
    assert {"heads.text.weight", "heads.image.weight"} <= set(trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj"}

    # one optimizer step moves adapters and heads, nothing else
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, mask, pixels = _text_and_pixels()
    out = model(query_input_ids=ids, query_attention_mask=mask, positive_pixel_values=pixels)
    (-(out["query"] * out["positive"]).sum() + out["query"].sum()).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n or n.startswith("heads.") for n in changed)
    assert any("lora_B" in n for n in changed) and "heads.text.weight" in changed


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
@pytest.mark.parametrize("kind", ["clip", "composed"])
def test_lora_saves_reload_to_equal_embeddings(kind, merge, tmp_path, tiny_clip_dir, tiny_bert_dir, tiny_vit_dir):
    if kind == "clip":
        model = EmbeddingModel.from_pretrained(tiny_clip_dir, projection_dim=8)
    else:
        model = EmbeddingModel.from_config(
            {"text_model_name": str(tiny_bert_dir), "image_model_name": str(tiny_vit_dir), "projection_dim": 8}
        )
    base = _embeddings(model)
    apply_lora(model, LORA)
    _perturb_adapters(model)
    live = _embeddings(model)
    assert not torch.allclose(live["text"], base["text"], atol=1e-3)  # the adapters matter
    saved = model.save_pretrained(tmp_path / "saved", merge_lora=merge)

    assert all(is_lora(b) for b in model.encoder.backbones().values())  # the live model keeps its adapters
    adapters = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("adapter_model.safetensors"))
    expected = (
        []
        if merge
        else (
            ["adapter_model.safetensors"]
            if kind == "clip"
            else ["image_encoder/adapter_model.safetensors", "text_encoder/adapter_model.safetensors"]
        )
    )
    assert adapters == expected

    reloaded = EmbeddingModel.from_pretrained(saved)
    assert all(is_lora(b) != merge for b in reloaded.encoder.backbones().values())
    again = _embeddings(reloaded)
    for modality in live:
        torch.testing.assert_close(again[modality], live[modality], atol=1e-5, rtol=1e-5)


def test_merged_save_is_a_plain_hf_model_with_the_adapter_folded_in(tmp_path, tiny_bert_dir):
    model = EmbeddingModel.from_pretrained(tiny_bert_dir)
    apply_lora(model, LORA)
    _perturb_adapters(model)
    saved = model.save_pretrained(tmp_path / "merged")
    hf = AutoModel.from_pretrained(saved)
    assert not any("lora" in key for key in hf.state_dict())
    # hand-merge one adapted layer: W + (alpha / r) * B @ A
    layer = model.encoder.backbone.get_base_model().encoder.layer[0].attention.self.query
    expected = layer.base_layer.weight + (LORA["lora_alpha"] / LORA["lora_r"]) * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    torch.testing.assert_close(hf.encoder.layer[0].attention.self.query.weight, expected.detach())


def _cls_vectors(backbone: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Plain transformers: CLS token of the last hidden state, L2-normalised (what pooling_method=cls means)."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = backbone.eval()(**batch).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(hidden, dim=-1)


def test_adapter_and_merged_checkpoints_reload_through_peft_and_plain_transformers(tmp_path, tiny_bert_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from vembed.inference import VEmbedFactoryPredictor

    model = EmbeddingModel.from_config({"model_name": str(tiny_bert_dir), "pooling_method": "cls"})
    apply_lora(model, LORA)
    _perturb_adapters(model)
    adapter = model.save_pretrained(tmp_path / "adapter", merge_lora=False)
    merged = model.save_pretrained(tmp_path / "merged", merge_lora=True)
    texts = ["a red circle", "two blue squares on a green field"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)

    # The adapter checkpoint is a PEFT adapter directory, not a model that loads as its base by mistake.
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"config.json", "model.safetensors", "lora_adapter"}
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == str(Path(tiny_bert_dir).resolve())
    via_peft = _cls_vectors(PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), adapter), tokenizer, texts)
    predictor = VEmbedFactoryPredictor(str(adapter))
    torch.testing.assert_close(torch.as_tensor(predictor.encode_text(texts)), via_peft, atol=1e-5, rtol=1e-5)
    base_vectors = _cls_vectors(AutoModel.from_pretrained(tiny_bert_dir), tokenizer, texts)
    assert not torch.allclose(via_peft, base_vectors, atol=1e-3)  # the adapter matters
    # transformers' own PEFT integration reads the directory as base + adapter too
    torch.testing.assert_close(_cls_vectors(AutoModel.from_pretrained(adapter), tokenizer, texts), via_peft)

    # The merged checkpoint is a plain HF model holding the merged weights.
    assert not any(p.name.startswith("adapter_") for p in merged.iterdir())
    via_automodel = _cls_vectors(AutoModel.from_pretrained(merged), tokenizer, texts)
    torch.testing.assert_close(via_automodel, via_peft, atol=1e-5, rtol=1e-5)
    merged_predictor = VEmbedFactoryPredictor(str(merged))
    torch.testing.assert_close(
        torch.as_tensor(merged_predictor.encode_text(texts)), via_automodel, atol=1e-5, rtol=1e-5
    )

    # Re-saving over an adapter checkpoint as merged (and back) leaves no stale files of the other layout.
    model.save_pretrained(adapter, merge_lora=True)
    assert not any(p.name.startswith("adapter_") for p in adapter.iterdir())
    model.save_pretrained(merged, merge_lora=False)
    assert not (merged / "model.safetensors").exists()


def test_an_adapter_checkpoint_whose_base_is_gone_names_it(tmp_path, tiny_bert_dir):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    model = EmbeddingModel.from_pretrained(base)
    apply_lora(model, LORA)
    adapter = model.save_pretrained(tmp_path / "adapter", merge_lora=False)
    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match=r"LoRA adapter checkpoint; its base model .*base is not available"):
        EmbeddingModel.from_pretrained(adapter)


def test_lora_errors_and_builder_switch(tiny_bert_dir):
    model = EmbeddingModel.from_pretrained(tiny_bert_dir)
    with pytest.raises(ValueError, match=r"match no linear layer.*'query'"):
        apply_lora(model, {**LORA, "lora_target_modules": ["q_proj"]})
    assert model_builder.apply_lora(model, {**LORA, "use_lora": False}) is model
    assert not is_lora(model.encoder.backbone)
    model_builder.apply_lora(model, {**LORA, "use_lora": True, "lora_target_modules": ["query", "value"]})
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {"query", "value"}
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LORA)
