"""Training a vlm model in process: LoRA targets, gradient checkpointing, default text length, every mode's step,
GradCache, and the seed guide's LoRA recipe learning a held-out retrieval task."""

from __future__ import annotations

import pytest
from peft.tuners.lora import LoraLayer

from vembed.model import EmbeddingModel, apply_lora

pytestmark = pytest.mark.unit


def _lora_layers(model):
    return sorted(name.split("base_model.model.")[-1] for name, m in model.named_modules() if isinstance(m, LoraLayer))


def test_lora_defaults_to_the_text_decoders_projections_and_opts_into_the_vision_tower(
    tiny_qwen3_vl_dir, tiny_clip_dir
):
    model = apply_lora(EmbeddingModel.from_pretrained(str(tiny_qwen3_vl_dir)), {"use_lora": True})
    expected = [
        f"language_model.layers.{i}.{p}"
        for i in range(2)
        for p in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj") + tuple(f"self_attn.{x}_proj" for x in "kovq")
    ]
    assert _lora_layers(model) == sorted(expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)

    with_vision = apply_lora(
        EmbeddingModel.from_pretrained(str(tiny_qwen3_vl_dir)), {"use_lora": True, "lora_vision_tower": True}
    )
    vision = [n for n in _lora_layers(with_vision) if n.startswith("visual.")]
    assert sorted(vision) == sorted(
        f"visual.blocks.{i}.{p}"
        for i in range(2)
        for p in ("attn.proj", "attn.qkv", "mlp.linear_fc1", "mlp.linear_fc2")
    )
    with pytest.raises(ValueError, match="lora_vision_tower applies to vlm models only; this is a dual model"):
        apply_lora(EmbeddingModel.from_pretrained(str(tiny_clip_dir)), {"use_lora": True, "lora_vision_tower": True})
