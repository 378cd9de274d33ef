"""Every snippet of the seed guide (sections 1-4) runs as written, with local model and data paths.

The guide's hub ids become tiny local model directories and ``data/*.jsonl`` the synthetic shapes data set;
everything else is the guide's code. Ray runs are real (a local Ray instance, TorchTrainer).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray

#: the tiny Qwen3-VL's LoRA recipe: a random 64-wide decoder behind a frozen random vision tower learns slowly, and
#: 1e-2 diverges; 16 records per step give it enough steps
VLM_LEARNING_RATE = 3e-3
VLM_BATCH_SIZE = 16
VLM_EPOCHS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vembed.testing import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("guide_data"), num_train=32, num_val=8, num_test=8)


@pytest.fixture(scope="module")
def section1_run(ray_local, tiny_clip_dir, data, tmp_path_factory):
    """Section 1 "Basic Usage" and Example 1 (positional call): one trainer, trained once."""
    from vembed.trainer import VEmbedFactoryTrainer

    output = tmp_path_factory.mktemp("guide_output") / "output"
    trainer = VEmbedFactoryTrainer(str(tiny_clip_dir))
    trainer.train(str(data["train"]), str(output), epochs=3)
    return trainer, output


def test_basic_usage_writes_epoch_checkpoints_that_load(section1_run):
    from vembed.inference import VEmbedFactoryPredictor

    trainer, output = section1_run
    for epoch in (1, 2, 3):
        assert (output / f"checkpoint-epoch-{epoch}" / "vembed.json").exists()
    assert trainer.result.error is None
    predictor = VEmbedFactoryPredictor(model_path=str(output / "checkpoint-epoch-3"))
    assert predictor.encode_text("a cat sitting on a chair").shape == (predictor.embedding_dim,)


def test_example1_evaluate_returns_retrieval_metrics(section1_run, data):
    trainer, _ = section1_run
    metrics = trainer.evaluate(str(data["test"]))
    assert {"recall@1", "mrr", "ndcg@10"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("recall@1", "mrr"))


def test_advanced_configuration_and_overrides(ray_local, tiny_clip_dir, data, tmp_path):
    """Section 1 "Advanced Configuration" then "Configuration Override" (use_lora=True)."""
    from vembed.trainer import VEmbedFactoryTrainer

    trainer = VEmbedFactoryTrainer(
        model_name_or_path=str(tiny_clip_dir),
        learning_rate=1e-5,
        batch_size=16,
        scheduler_type="cosine",
        warmup_ratio=0.1,
    )
    assert trainer.config["batch_size"] == 16 and trainer.config.scheduler_type == "cosine"
    trainer.train(
        data_path=str(data["train"]),
        val_data_path=str(data["val"]),
        output_dir=str(tmp_path / "advanced"),
        epochs=1,
    )
    assert (tmp_path / "advanced" / "checkpoint-epoch-1").is_dir()
    assert "val_loss" in json.dumps(trainer.result.metrics) or "val_" in " ".join(trainer.result.metrics)

    trainer = VEmbedFactoryTrainer(str(tiny_clip_dir))
    trainer.train(
        data_path=str(data["train"]),
        output_dir=str(tmp_path / "override"),
        epochs=2,
        batch_size=16,
        learning_rate=5e-5,
        use_lora=True,
    )
    saved = json.loads((tmp_path / "override" / "checkpoint-epoch-2" / "vembed.json").read_text())
    assert saved["family"] == "dual"
    assert (tmp_path / "override" / "config.yaml").exists() or any((tmp_path / "override").rglob("*.yaml"))


def test_section2_predictor_and_example4(section1_run, data):
    from vembed.inference import VEmbedFactoryPredictor

    _, output = section1_run
    ckpt = str(output / "checkpoint-epoch-3")
    predictor = VEmbedFactoryPredictor(model_path=ckpt)
    images = sorted(str(p) for p in data["images"].iterdir())[:3]
    assert predictor.encode_image(images[0]).shape == (predictor.embedding_dim,)
    embeddings = predictor.encode_text(["a cat", "a dog", "a bird"], batch_size=32)
    assert embeddings.shape == (3, predictor.embedding_dim)
    similarities = predictor.similarity(query_text="a cat", documents=images)
    assert similarities.shape == (3,)

    for kwargs in ({"device": "cpu"}, {"dtype": "float16"}, {"dtype": "bfloat16"}, {"pooling_method": "mean"}):
        assert VEmbedFactoryPredictor(model_path=ckpt, **kwargs).encode_text("a cat").shape == (32,)

    query_embs = predictor.encode_text(["a cat", "a dog", "a bird"])
    image_embs = predictor.encode_image(images)
    similarity = np.dot(query_embs, image_embs.T)
    assert similarity.shape == (3, 3)


def _guide_custom_loop(config_path, monkeypatch):
    """Section 3 "Example: Custom Training Loop", verbatim apart from where the config comes from."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from vembed.data.dataset import VisualRetrievalDataset
    from vembed.data.registry import CollatorRegistry
    from vembed.losses.factory import LossFactory
    from vembed.training.config import load_and_parse_config
    from vembed.training.model_builder import build_model, load_processor
    from vembed.training.optimizer_builder import build_optimizer

    monkeypatch.setattr("sys.argv", ["train.py", str(config_path)])
    config = load_and_parse_config()
    accelerator = Accelerator(cpu=True)
    model = build_model(config)
    processor = load_processor(config["model_name"])
    dataset = VisualRetrievalDataset(data_source=config["data_path"], processor=processor, mode="train")
    collator = CollatorRegistry.get("default")(processor=processor, mode="train")
    dataloader = DataLoader(dataset, batch_size=config["batch_size"], collate_fn=collator, shuffle=True)
    optimizer = build_optimizer(model, config)
    criterion = LossFactory.create(config)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    model.train()
    losses, seen = [], []
    for _epoch in range(config["epochs"]):
        for batch in dataloader:
            outputs = model(**batch)
            loss = criterion(outputs, batch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            seen.append(batch)  # for a reference that replays the shuffled batches
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    return losses, before, after, model, seen


def test_section3_custom_training_loop_with_accelerate(tiny_clip_dir, data, tmp_path, monkeypatch):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"model_name: {tiny_clip_dir}\ndata_path: {data['train']}\nbatch_size: 8\nepochs: 2\nlearning_rate: 1.0e-3\n"
    )
    losses, before, after, _, _ = _guide_custom_loop(cfg, monkeypatch)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_section3_key_modules(tiny_clip_dir, data, tmp_path):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from vembed.data.dataset import VisualRetrievalDataset
    from vembed.data.registry import CollatorRegistry
    from vembed.losses.factory import LossFactory
    from vembed.training.config import load_base_config, merge_configs
    from vembed.training.model_builder import apply_lora, build_model, compile_model, load_processor
    from vembed.training.optimizer_builder import build_optimizer, build_scheduler
    from vembed.training.training_loop import Trainer

    defaults = load_base_config()
    user_config = {"model_name": str(tiny_clip_dir), "data_path": str(data["train"]), "output_dir": str(tmp_path)}
    config = merge_configs(defaults, user_config)
    config = merge_configs(config, {"epochs": 1, "batch_size": 8, "use_lora": True, "logging_steps": 1})

    accelerator = Accelerator(cpu=True)
    model = build_model(config)
    processor = load_processor(str(tiny_clip_dir))
    apply_lora(model, config, accelerator)
    model = compile_model(model, config, accelerator)
    assert any("lora_" in name for name, _ in model.named_parameters())

    dataset = VisualRetrievalDataset(data_source=str(data["train"]), processor=processor, mode="train")
    collator = CollatorRegistry.get("default")(processor=processor, mode="train")
    dataloader = DataLoader(dataset, batch_size=8, collate_fn=collator, shuffle=True)

    criterion = LossFactory.create(config)
    criterion = LossFactory.create_loss(loss_type="infonce", config=config)
    batch = next(iter(dataloader))
    loss = criterion(model(**batch), batch)
    assert loss.ndim == 0 and torch.isfinite(loss)

    optimizer = build_optimizer(model, config)
    num_epochs, steps_per_epoch = 1, len(dataloader)
    scheduler, warmup_steps = build_scheduler(optimizer, config, num_epochs, steps_per_epoch)
    assert warmup_steps == 0

    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        dataloader=dataloader,
        criterion=criterion,
        accelerator=accelerator,
        config=config,
        scheduler=scheduler,
    )
    trainer.train()
    assert (tmp_path / "checkpoint-epoch-1" / "vembed.json").exists()


def test_example2_lora_config_dict(tiny_clip_dir, data, tmp_path):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from vembed.data.dataset import VisualRetrievalDataset
    from vembed.data.registry import CollatorRegistry
    from vembed.losses.factory import LossFactory
    from vembed.training.model_builder import apply_lora, build_model, load_processor
    from vembed.training.optimizer_builder import build_optimizer
    from vembed.training.training_loop import Trainer

    config = {
        "model_name": str(tiny_clip_dir),
        "use_lora": True,
        "lora_r": 16,
    }

    accelerator = Accelerator(cpu=True)
    model = build_model(config)
    apply_lora(model, config, accelerator)

    processor = load_processor(config["model_name"])
    dataset = VisualRetrievalDataset(data_source=str(data["train"]), processor=processor, mode="train")
    dataloader = DataLoader(
        dataset, batch_size=16, collate_fn=CollatorRegistry.get("default")(processor=processor, mode="train")
    )
    optimizer = build_optimizer(model, config)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        dataloader=dataloader,
        criterion=LossFactory.create(config),
        accelerator=accelerator,
        config={**config, "epochs": 1, "output_dir": str(tmp_path)},
    )
    trainer.train()
    assert (tmp_path / "checkpoint-epoch-1").is_dir()


def test_aliases():
    import vembed
    from vembed import Predictor, Trainer
    from vembed.inference import VEmbedFactoryPredictor
    from vembed.trainer import VEmbedFactoryTrainer

    assert Trainer is VEmbedFactoryTrainer and Predictor is VEmbedFactoryPredictor
    with pytest.raises(AttributeError):
        vembed.NoSuchThing  # noqa: B018


def _caption_to_image_top1(model_dir, preprocessor, records) -> float:
    """Held-out text-to-image top-1 of a model directory, embedding each item as the official VLM format."""
    from vembed.data.images import load_image
    from vembed.model import EmbeddingModel

    model = EmbeddingModel.from_pretrained(str(model_dir)).eval()
    texts = preprocessor.process_conversations([r["query"] for r in records], None)
    images = preprocessor.process_conversations(None, [load_image(r["positive"]) for r in records])
    with torch.no_grad():
        queries = model.encode(**{k: torch.from_numpy(v) for k, v in texts.items()})
        documents = model.encode(**{k: torch.from_numpy(v) for k, v in images.items()})
    best = (queries @ documents.T).argmax(dim=1)
    return float((best == torch.arange(len(records))).float().mean())


def test_advanced_configuration_with_lora_learns_vlm_retrieval(ray_local, tiny_qwen3_vl_dir, tmp_path):
    """Section 1 "Advanced Configuration" with use_lora=True on a tiny Qwen3-VL: held-out top-1 rises by > 0.4.

    The learning rate is the tiny model's (LoRA on a random 64-wide decoder); the rest is the guide's call.
    """
    from vembed.data.processing import Preprocessor
    from vembed.testing import make_shapes_dataset
    from vembed.trainer import VEmbedFactoryTrainer

    vlm_data = make_shapes_dataset(tmp_path / "data", num_train=384, num_val=16, num_test=16, seed=1)
    test = [json.loads(line) for line in vlm_data["test"].read_text().splitlines()]
    preprocessor = Preprocessor.from_pretrained(tiny_qwen3_vl_dir)
    before = _caption_to_image_top1(tiny_qwen3_vl_dir, preprocessor, test)

    trainer = VEmbedFactoryTrainer(
        model_name_or_path=str(tiny_qwen3_vl_dir),
        learning_rate=VLM_LEARNING_RATE,
        batch_size=VLM_BATCH_SIZE,
        scheduler_type="cosine",
        warmup_ratio=0.1,
    )
    trainer.train(
        data_path=str(vlm_data["train"]),
        val_data_path=str(vlm_data["val"]),
        output_dir=str(tmp_path / "vlm"),
        epochs=VLM_EPOCHS,
        use_lora=True,
    )
    assert trainer.result.error is None
    saved = json.loads((tmp_path / "vlm" / f"checkpoint-epoch-{VLM_EPOCHS}" / "vembed.json").read_text())
    assert saved["family"] == "vlm"
    after = _caption_to_image_top1(tmp_path / "vlm" / f"checkpoint-epoch-{VLM_EPOCHS}", preprocessor, test)
    assert after - before > 0.4, f"held-out top-1 {before:.2f} -> {after:.2f}"


def test_section3_trainer_trains_the_losss_own_parameters(tiny_siglip_dir, data, tmp_path):
    """The guide's "Trainer Class" snippet with ``build_optimizer(model, config)`` (the loss is built after the
    optimizer and never passed to it) must still train SigLIP's logit scale and bias, on the model's device. The
    model holds them (``model.logit_parameters``, as open_clip's CLIP does). Reference: a hand-written
    single-process loop with one AdamW over model and loss parameters."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from vembed.data.dataset import VisualRetrievalDataset
    from vembed.data.registry import CollatorRegistry
    from vembed.losses.factory import LossFactory
    from vembed.training.config import load_base_config, merge_configs
    from vembed.training.model_builder import build_model, load_processor
    from vembed.training.optimizer_builder import build_optimizer, build_scheduler
    from vembed.training.training_loop import Trainer

    config = merge_configs(
        load_base_config(),
        {"model_name": str(tiny_siglip_dir), "loss_type": "sigmoid", "epochs": 1, "batch_size": 8,
         "learning_rate": 1e-2, "weight_decay": 0.0, "warmup_steps": 1, "output_dir": str(tmp_path)},
    )  # fmt: skip
    processor = load_processor(str(tiny_siglip_dir))
    dataset = VisualRetrievalDataset(data_source=str(data["train"]), processor=processor, mode="train")
    collator = CollatorRegistry.get("default")(processor=processor, mode="train")
    batches = list(DataLoader(dataset, batch_size=8, collate_fn=collator, shuffle=False))[:2]

    # the guide's code
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(model, config)
    criterion = LossFactory.create(config)
    held = model.logit_parameters
    initial = (held.logit_scale.log_scale.item(), held.logit_bias.item())
    scheduler, _ = build_scheduler(optimizer, config, 1, len(batches))
    Trainer(model, optimizer, batches, criterion, accelerator=Accelerator(cpu=True), config=config,
            scheduler=scheduler).train()  # fmt: skip
    trained = (held.logit_scale.log_scale.item(), held.logit_bias.item())

    # the reference: plain PyTorch
    torch.manual_seed(0)
    ref_model = build_model(config)
    ref_loss = LossFactory.create(config)
    params = [*ref_model.parameters(), *ref_loss.parameters()]
    ref_opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    ref_sched = get_scheduler("cosine", ref_opt, num_warmup_steps=1, num_training_steps=len(batches))
    ref_model.train()
    for batch in batches:
        torch.manual_seed(config.seed)  # the Trainer's per-epoch seed (dropout); one epoch here
        ref_loss(ref_model(**batch), batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad()
    ref_held = ref_model.logit_parameters
    expected = (ref_held.logit_scale.log_scale.item(), ref_held.logit_bias.item())

    assert abs(trained[0] - initial[0]) > 1e-3 and abs(trained[1] - initial[1]) > 1e-3
    assert trained == pytest.approx(expected, abs=1e-5)


GUIDE_LOOP_EPOCHS = 3
#: the learnable temperature starts 1% inside its floor (scale 1/99 vs the clamp's 1/100): the first step crosses it
START_TEMPERATURE = 99.0


def _reference_logit_training(model_dir, batches, loss_type, lr, weight_decay, temperature):
    """Independent reference for the guide's loop: plain AdamW steps on its batches, with the loss written out
    by hand over a scale and bias that are plain leaf tensors (open_clip's recipe: clamp ``log_scale`` to
    [log 0.01, log 100] after each step; no decay on scale and bias). Returns per step the unclamped and the
    clamped ``log_scale``, and the final bias (None without one)."""
    import math

    import torch.nn.functional as F

    from vembed.model import EmbeddingModel
    from vembed.training.optimizer_builder import parameter_groups

    model = EmbeddingModel.from_pretrained(str(model_dir)).train()
    sigmoid = loss_type == "sigmoid"
    log_scale = torch.tensor(math.log(10.0 if sigmoid else 1.0 / temperature), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True) if sigmoid else None
    own = [log_scale] + ([bias] if sigmoid else [])
    groups = [*parameter_groups([model], weight_decay), {"params": own, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    history = []
    for batch in batches:
        out = model(**batch)
        q, p = out["query"], out["positive"]
        logits = log_scale.exp() * q @ p.T
        same = (batch["labels"][:, None] == batch["labels"][None, :]).float()  # same label: positives
        if sigmoid:  # Zhai et al.: every pair a binary decision, summed per query, mean over queries
            loss = -F.logsigmoid((2 * same - 1) * (logits + bias)).sum() / len(q)
        else:  # both directions, each row averaging over its positives (Khosla et al.'s L_out)
            rows = [-(torch.log_softmax(x, dim=-1) * same).sum(-1) / same.sum(-1) for x in (logits, logits.T)]
            loss = (rows[0].mean() + rows[1].mean()) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        raw = log_scale.item()
        with torch.no_grad():
            log_scale.clamp_(math.log(1e-2), math.log(100.0))
        history.append((raw, log_scale.item()))
    return history, None if bias is None else bias.item()


@pytest.mark.parametrize(
    "family, loss_settings",
    [
        ("tiny_siglip_dir", "loss_type: sigmoid\n"),
        ("tiny_clip_dir", f"loss_type: infonce\nlearnable_temperature: true\ntemperature: {START_TEMPERATURE}\n"),
    ],
    ids=["siglip", "infonce-learnable"],
)
def test_section3_custom_loop_trains_the_losss_parameters(family, loss_settings, request, data, tmp_path, monkeypatch):
    """Issue 16 item 7 for the guide's custom loop as written: ``build_optimizer(model, config)`` before
    ``LossFactory.create(config)``, accelerate, ``criterion(outputs, batch)``, no vembed Trainer. The model holds
    SigLIP's scale and bias / the learnable temperature, so the loop trains them, without weight decay, and the
    scale is clamped after each step (InfoNCE starts 1% inside the clamp's range, so a step leaves it). Against
    the hand-written reference above, whose leaving the range is checked too."""
    import math

    from vembed.losses.scale import MAX_SCALE, MIN_SCALE

    model_dir = request.getfixturevalue(family)
    lr, weight_decay = 0.05, 0.1
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"model_name: {model_dir}\ndata_path: {data['train']}\nbatch_size: 32\nepochs: {GUIDE_LOOP_EPOCHS}\n"
        f"learning_rate: {lr}\nweight_decay: {weight_decay}\n{loss_settings}"
    )
    losses, _, _, model, batches = _guide_custom_loop(cfg, monkeypatch)
    assert len(losses) == GUIDE_LOOP_EPOCHS and all(np.isfinite(losses))

    sigmoid = "sigmoid" in loss_settings
    history, expected_bias = _reference_logit_training(
        model_dir, batches, "sigmoid" if sigmoid else "infonce", lr, weight_decay, temperature=START_TEMPERATURE
    )
    held = model.logit_parameters
    got_scale = held.logit_scale.log_scale.item()
    start = math.log(10.0) if sigmoid else math.log(1 / START_TEMPERATURE)
    assert abs(got_scale - start) > 1e-3  # trained
    assert got_scale == pytest.approx(history[-1][1], abs=1e-5)
    bounds = (math.log(MIN_SCALE), math.log(MAX_SCALE))
    assert bounds[0] - 1e-7 <= got_scale <= bounds[1] + 1e-7
    if sigmoid:
        assert abs(held.logit_bias.item() + 10.0) > 1e-3
        assert held.logit_bias.item() == pytest.approx(expected_bias, abs=1e-5)
    else:
        assert any(not bounds[0] <= raw <= bounds[1] for raw, _ in history), "the reference never left the range"
