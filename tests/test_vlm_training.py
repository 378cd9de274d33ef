"""Training a vlm model in process: LoRA targets, gradient checkpointing, default text length, every mode's step,
GradCache, and the seed guide's LoRA recipe learning a held-out retrieval task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image

from vembed.config import load_config_file
from vembed.data.collators import DefaultCollator
from vembed.data.processing import Preprocessor
from vembed.losses.factory import LossFactory
from vembed.model import EmbeddingModel, apply_lora
from vembed.testing import make_shapes_dataset
from vembed.testing.synthetic import MODES
from vembed.training.grad_cache import GradCache, split_batch
from vembed.training.model_builder import build_model, load_processor
from vembed.training.optimizer_builder import build_optimizer
from vembed.training.worker import build_training_model

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------------- one step per mode
def _records(tmp_path, mode, num=4, negatives=1, seed=0):
    """Records of ``mode``; every other image is enlarged to 96 px (a 6x6 grid instead of 4x4), so the batch's
    items have different numbers of patches and image tokens."""
    data = make_shapes_dataset(
        tmp_path / mode, num_train=num, num_val=0, num_test=0, mode=mode, num_negatives=negatives, seed=seed
    )
    for i, path in enumerate(sorted(data["images"].iterdir())):
        if i % 2 == 0:
            Image.open(path).resize((96, 96)).save(path)
    return [json.loads(line) for line in data["train"].read_text().splitlines()]


def _batch(records, preprocessor, mode):
    collate = DefaultCollator(preprocessor, mode="train", retrieval_mode=mode)
    return collate(records)


@pytest.fixture(scope="module")
def vlm_preprocessor(tiny_qwen3_vl_dir):
    return load_processor(str(tiny_qwen3_vl_dir))


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_a_step(mode, tiny_qwen3_vl_dir, vlm_preprocessor, tmp_path):
    records = _records(tmp_path, mode)
    batch = _batch(records, vlm_preprocessor, mode)
    image_roles = {
        "t2i": ["positive", "negative"],
        "i2t": ["query"],
        "i2i": ["query", "positive", "negative"],
        "t2t": [],
        "m2i": ["query", "positive", "negative"],
        "m2t": ["query"],
    }[mode]
    assert sorted(k for k in batch if k.endswith("_image_grid_thw")) == sorted(
        f"{r}_image_grid_thw" for r in image_roles
    )
    assert batch["negative_input_ids"].shape[:2] == (4, 1)
    config = {"model_name": str(tiny_qwen3_vl_dir), "learning_rate": 1e-3, "use_lora": True, "retrieval_mode": mode}
    torch.manual_seed(0)
    model = apply_lora(build_model(config), config)
    criterion = LossFactory.create(config)
    optimizer = build_optimizer(model, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    outputs = model(**batch)
    assert outputs["query"].shape == (4, 64) and outputs["negatives"].shape == (4, 1, 64)
    loss = criterion(outputs, batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved), "the LoRA step did not move the adapters"


# -------------------------------------------------------------- GradCache and gradient checkpointing equal the step
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_cache_chunks_by_item_and_equals_the_full_batch(tiny_qwen3_vl_dir, vlm_preprocessor, tmp_path):
    records = _records(tmp_path, "m2i", num=5, negatives=1, seed=4)
    batch = _batch(records, vlm_preprocessor, "m2i")
    sizes = batch["positive_image_grid_thw"].prod(-1).tolist()
    assert len(set(sizes)) > 1, "the batch must mix image sizes for the chunking to be tested"
    config = {"model_name": str(tiny_qwen3_vl_dir), "temperature": 0.1}
    torch.manual_seed(0)
    model = build_model(config).train()
    criterion = LossFactory.create(config)
    criterion(model(**batch), batch).backward()
    expected = _grads(model)
    model.zero_grad()

    chunks = split_batch(batch, 2)  # items 0-1, 2-3, 4: each chunk carries only its own patches and grid rows
    assert [c["positive_image_grid_thw"].shape[0] for c in chunks] == [2, 2, 1]
    assert sum(c["positive_pixel_values"].shape[0] for c in chunks) == batch["positive_pixel_values"].shape[0]
    GradCache(model, criterion, chunk_size=2).step(batch)
    got = _grads(model)
    assert got.keys() == expected.keys() and any("visual" in n for n in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)

    torch.manual_seed(0)
    checkpointed = build_model({**config, "gradient_checkpointing": True}).train()
    criterion(checkpointed(**batch), batch).backward()
    for name, grad in _grads(checkpointed).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize(
    "preset, model_fixture, mode",
    [
        ("train_qwen3_vl_t2i_lora.yaml", "tiny_qwen3_vl_dir", "t2i"),
        ("train_qwen3_vl_t2i_lora_fsdp.yaml", "tiny_qwen3_vl_dir", "t2i"),
        ("train_colqwen_vl_lora.yaml", "tiny_qwen3_vl_dir", "t2i"),
        ("train_qwen3_embedding_t2t.yaml", "tiny_qwen3_embedding_dir", "t2t"),
    ],
)
def test_presets_load_and_train_a_step_on_a_local_model(preset, model_fixture, mode, request, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    data = make_shapes_dataset(tmp_path / "data", num_train=4, num_val=0, num_test=0, mode=mode, seed=2)
    cfg = load_config_file(
        REPO / "configs" / preset,
        [
            f"model_name={model_dir}",
            f"data_path={data['train']}",
            f"output_dir={tmp_path / 'out'}",
            "image_max_pixels=16384",
            "max_text_length=256",
            "use_gpu=false",
            "mixed_precision=no",
            "mrl_dims=[16,32]",  # the tiny decoders are 64 wide
        ],
    )
    assert cfg.retrieval_mode == mode and cfg.query_instruction
    model = build_training_model(cfg)  # LoRA and gradient checkpointing as the preset says
    assert model.family == ("vlm" if "vl" in preset else "text")
    assert model.vector_tokens == ("content" if "colqwen" in preset else None)
    assert cfg.strategy == ("fsdp" if "fsdp" in preset else "ddp")
    preprocessor = Preprocessor.from_config(cfg)
    batch = DefaultCollator(preprocessor, mode="train", retrieval_mode=mode)(
        [json.loads(line) for line in data["train"].read_text().splitlines()]
    )
    instructed = preprocessor.tokenizer.decode(batch["query_input_ids"][0])
    assert cfg.query_instruction in instructed  # the preset's query instruction reaches the training input
    criterion = LossFactory.create(cfg)
    optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
    model.train()
    loss = criterion(model(**batch), batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
