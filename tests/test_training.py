"""The Trainer step in one process: learning, accumulation, GradCache, distillation, modes, accelerate, resume state.

Distributed runs on Ray are in test_training_distributed.py and test_resume_fault.py; they use this same Trainer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vembed.data.dataset import VisualRetrievalDataset
from vembed.data.registry import CollatorRegistry
from vembed.losses.factory import LossFactory
from vembed.model import EmbeddingModel
from vembed.testing import make_shapes_dataset
from vembed.training.checkpointing import load_training_state, save_training_state
from vembed.training.config import as_config, load_and_parse_config
from vembed.training.model_builder import apply_lora, build_model, load_processor
from vembed.training.optimizer_builder import build_optimizer, build_scheduler
from vembed.training.training_loop import Trainer

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention (tens of x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loader(path, model_dir, mode="t2i", batch_size=8, split="train", shuffle=False):
    processor = load_processor(str(model_dir))
    dataset = VisualRetrievalDataset(path, processor, mode=split, retrieval_mode=mode)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collator(), shuffle=shuffle)


def _config(model_dir, tmp_path, **overrides):
    return as_config(
        {
            "model_name": str(model_dir),
            "output_dir": str(tmp_path / "out"),
            "epochs": 1,
            "batch_size": 8,
            "logging_steps": 1,
            "mixed_precision": "no",
            **overrides,
        }
    )


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def shapes_small(tmp_path_factory) -> dict[str, Path]:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes_small"), num_train=24, num_val=16, num_test=8)


def test_loss_falls_and_recall_rises_in_a_short_run(tiny_clip_dir, shapes_t2i, tmp_path):
    epochs = 12
    cfg = _config(tiny_clip_dir, tmp_path, epochs=epochs, batch_size=16, learning_rate=2e-3, temperature=0.1)
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = LossFactory.create(cfg)
    optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
    train = _loader(shapes_t2i["train"], tiny_clip_dir, batch_size=16, shuffle=True)
    val = _loader(shapes_t2i["val"], tiny_clip_dir, batch_size=16, split="eval")
    scheduler, _ = build_scheduler(optimizer, cfg, cfg.epochs, len(train))
    trainer = Trainer(model, optimizer, train, criterion, config=cfg, scheduler=scheduler, val_dataloader=val)

    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    losses = [m["loss"] for m in trainer.history if "val_loss" not in m]
    assert len(losses) == epochs * len(train)
    per_epoch = len(train)
    first_epoch, last_epoch = sum(losses[:per_epoch]) / per_epoch, sum(losses[-per_epoch:]) / per_epoch
    # Runs are not bit-identical (even the untrained validation loss varies a little), so the bars leave room.
    assert last_epoch < 0.9 * first_epoch, losses
    assert after["val_loss"] < before["val_loss"]
    assert after["val_mrr"] > before["val_mrr"] + 0.1, (before, after)
    assert after["val_recall@5"] > before["val_recall@5"]
    for epoch in range(1, epochs + 1):
        assert (tmp_path / "out" / f"checkpoint-epoch-{epoch}" / "vembed.json").is_file()
    assert (tmp_path / "out" / "config.yaml").is_file()


@pytest.mark.parametrize("mode", ["t2i", "i2i", "i2t", "t2t", "m2i", "m2t"])
def test_every_mode_trains_one_step_and_saves_a_loadable_checkpoint(mode, tiny_clip_dir, tmp_path):
    data = make_shapes_dataset(tmp_path / "data", num_train=8, num_val=0, num_test=0, mode=mode, num_negatives=1)
    cfg = _config(tiny_clip_dir, tmp_path, retrieval_mode=mode, learning_rate=1e-3)
    model = build_model(cfg)
    before = _weights(model)
    criterion = LossFactory.create(cfg)
    loader = _loader(data["train"], tiny_clip_dir, mode=mode)
    trainer = Trainer(model, build_optimizer(model, cfg), loader, criterion, config=cfg)
    metrics = trainer.train()

    assert metrics["step"] == 1 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert _max_diff(before, _weights(model)) > 0
    saved = EmbeddingModel.from_pretrained(tmp_path / "out" / "checkpoint-epoch-1")
    assert _max_diff(_weights(saved), _weights(model)) == 0


def _sgd_trainer(model_dir, tmp_path, batches, **overrides):
    """A Trainer with plain SGD(lr=1): each step moves the weights by exactly minus the gradient."""
    cfg = _config(model_dir, tmp_path, max_grad_norm=0.0, **overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = LossFactory.create(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return Trainer(model, optimizer, batches, criterion, config=cfg), criterion


def _collated(path, model_dir, batch_size):
    return list(_loader(path, model_dir, batch_size=batch_size))


def test_gradient_accumulation_averages_micro_batches_and_flushes_the_epoch_end(tiny_clip_dir, shapes_small, tmp_path):
    batches = _collated(shapes_small["train"], tiny_clip_dir, batch_size=8)  # 3 micro-batches
    trainer, criterion = _sgd_trainer(tiny_clip_dir, tmp_path, batches, gradient_accumulation_steps=2)
    reference = copy.deepcopy(trainer.model)
    trainer.train()
    assert trainer.progress.step == 2

    # Reference, written out: step 1 = mean of the first two micro-batch gradients, step 2 = the third alone.
    def grads(batch):
        reference.zero_grad()
        criterion(reference(**batch), batch).backward()
        return {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}

    g1, g2 = grads(batches[0]), grads(batches[1])
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if n in g1:
                p -= (g1[n] + g2[n]) / 2
    g3 = grads(batches[2])
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if n in g3:
                p -= g3[n]
    assert _max_diff(_weights(reference), _weights(trainer.model)) < 1e-5


def test_grad_cache_step_equals_the_full_batch_step(tiny_clip_dir, shapes_small, tmp_path):
    batches = _collated(shapes_small["train"], tiny_clip_dir, batch_size=8)[:1]
    plain, _ = _sgd_trainer(tiny_clip_dir, tmp_path / "a", batches)
    cached, _ = _sgd_trainer(tiny_clip_dir, tmp_path / "b", batches, grad_cache=True, grad_cache_chunk_size=3)
    start = _weights(plain.model)
    plain.train()
    cached.train()
    assert _max_diff(start, _weights(plain.model)) > 1e-3
    assert _max_diff(_weights(plain.model), _weights(cached.model)) < 1e-5


def test_distillation_uses_a_frozen_teacher(tiny_clip_dir, shapes_small, tmp_path):
    cfg = _config(tiny_clip_dir, tmp_path, loss_type="distillation", teacher_model_name=str(tiny_clip_dir))
    cfg = cfg.replace(distill_alpha=1.0, learning_rate=1e-2)
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():  # make the student differ from the teacher so there is something to distil
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    criterion = LossFactory.create(cfg)
    batches = _collated(shapes_small["train"], tiny_clip_dir, batch_size=8)
    trainer = Trainer(model, build_optimizer(model, cfg), batches, criterion, config=cfg.replace(epochs=3))
    teacher_before = _weights(trainer.teacher)
    trainer.train()

    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert _max_diff(teacher_before, _weights(trainer.teacher)) == 0
    losses = [m["loss"] for m in trainer.history]
    per_epoch = len(losses) // 3  # the same batches every epoch: compare the first epoch's mean with the last's
    first, last = sum(losses[:per_epoch]) / per_epoch, sum(losses[-per_epoch:]) / per_epoch
    assert last < first, losses  # the student moves towards the teacher's similarities


def test_distillation_refuses_a_teacher_that_cannot_read_the_students_inputs(tiny_clip_dir, tiny_bert_dir, tmp_path):
    """The teacher gets the student's token ids and pixels: a teacher with another tokenizer or another image
    normalisation must be refused at construction, naming what differs (reference: the hand-edited file)."""
    import json
    import shutil

    from vembed.config import ConfigError

    other_pixels = tmp_path / "clip_other_mean"
    shutil.copytree(tiny_clip_dir, other_pixels)
    processor_config = other_pixels / "processor_config.json"
    settings = json.loads(processor_config.read_text())
    settings["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    processor_config.write_text(json.dumps(settings))
    cases = [(tiny_bert_dir, r"tokenizer vocabulary .*the teacher has no image processor"),
             (other_pixels, r"image processor image_mean \(\[0\.4.* vs \[0\.5, 0\.5, 0\.5\]\)")]  # fmt: skip
    for teacher, problem in cases:
        cfg = _config(tiny_clip_dir, tmp_path, loss_type="distillation", teacher_model_name=str(teacher))
        model = build_model(cfg)
        with pytest.raises(ConfigError, match=rf"teacher_model_name=.*cannot read the student's batches.*{problem}"):
            Trainer(model, build_optimizer(model, cfg), [], LossFactory.create(cfg), config=cfg)


def test_bf16_autocast_step_runs_on_cpu(tiny_clip_dir, shapes_small, tmp_path):
    cfg = _config(tiny_clip_dir, tmp_path, mixed_precision="bf16")
    model = build_model(cfg)
    batches = _collated(shapes_small["train"], tiny_clip_dir, batch_size=8)[:1]
    trainer = Trainer(model, build_optimizer(model, cfg), batches, LossFactory.create(cfg), config=cfg)
    assert trainer._amp_dtype == torch.bfloat16
    assert torch.isfinite(torch.tensor(trainer.train()["loss"]))


def test_seed_guide_custom_loop_with_a_real_accelerator(tiny_clip_dir, shapes_small, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    overrides = [f"model_name={tiny_clip_dir}", f"data_path={shapes_small['train']}", "batch_size=8", "epochs=1"]
    config = load_and_parse_config(["--config_override", *overrides, f"output_dir={tmp_path / 'out'}"])

    # The seed guide, section 3 "Example: Custom Training Loop", with local paths.
    accelerator = accelerate.Accelerator(cpu=True)
    model = build_model(config)
    processor = load_processor(config["model_name"])
    dataset = VisualRetrievalDataset(data_source=config["data_path"], processor=processor, mode="train")
    collator = CollatorRegistry.get("default")(processor=processor, mode="train")
    dataloader = DataLoader(dataset, batch_size=config["batch_size"], collate_fn=collator, shuffle=True)
    optimizer = build_optimizer(model, config)
    criterion = LossFactory.create(config)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    before = _weights(model)
    model.train()
    for _epoch in range(config["epochs"]):
        for batch in dataloader:
            outputs = model(**batch)
            loss = criterion(outputs, batch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    assert torch.isfinite(loss) and _max_diff(before, _weights(model)) > 0

    # ... and the same pieces through the guide's Trainer class with the accelerator.
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        dataloader=dataloader,
        criterion=criterion,
        accelerator=accelerator,
        config=config,
        scheduler=None,
    )
    metrics = trainer.train()
    assert metrics["step"] == len(dataloader)
    assert (tmp_path / "out" / "checkpoint-epoch-1" / "vembed.json").is_file()


def test_fsdp_through_accelerate_is_refused_at_construction_pointing_to_ray_train(tiny_clip_dir, tmp_path):
    # The guide's Example 3 prepared a model accelerate had wrapped with FSDP, trained it and failed at the first
    # save on its DTensor weights. The Trainer now refuses such a model up front and says where FSDP works.
    accelerate = pytest.importorskip("accelerate")
    import torch.distributed as dist

    from vembed.training.distributed import is_sharded, wrap_model

    cfg = _config(tiny_clip_dir, tmp_path, strategy="fsdp")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = wrap_model(build_model(cfg), cfg, torch.device("cpu"))  # a real FSDP2-sharded model
        assert is_sharded(model)
        with pytest.raises(
            ValueError, match=r"does not support FSDP through accelerate.*under Ray Train.*strategy: fsdp"
        ):
            Trainer(
                model,
                build_optimizer(model, cfg),
                [],
                LossFactory.create(cfg),
                accelerator=accelerate.Accelerator(cpu=True),
                config=cfg,
            )
    finally:
        dist.destroy_process_group()


def test_resume_state_continues_exactly_where_it_stopped(tiny_clip_dir, shapes_small, tmp_path):
    batches = _collated(shapes_small["train"], tiny_clip_dir, batch_size=8)

    def make(epochs, out):
        cfg = _config(tiny_clip_dir, tmp_path / out, epochs=epochs, learning_rate=1e-3, learnable_temperature=True)
        torch.manual_seed(0)
        model = build_model(cfg)
        criterion = LossFactory.create(cfg)
        optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
        scheduler, _ = build_scheduler(optimizer, cfg, 2, len(batches))
        return Trainer(model, optimizer, batches, criterion, config=cfg, scheduler=scheduler)

    straight = make(2, "straight")
    straight.train()

    first = make(1, "first")
    first.train()
    save_training_state(
        tmp_path / "state", first.model, first.optimizer, first.scheduler, first.progress, {"loss": first.criterion}
    )
    resumed = make(2, "resumed")
    progress = load_training_state(
        tmp_path / "state", resumed.model, resumed.optimizer, resumed.scheduler, {"loss": resumed.criterion}
    )
    assert (progress.epoch, progress.step) == (1, len(batches))
    resumed.progress = progress
    resumed.train()

    assert _max_diff(_weights(straight.model), _weights(resumed.model)) < 1e-6
    assert float(straight.criterion.logit_scale.log_scale.detach()) == pytest.approx(
        float(resumed.criterion.logit_scale.log_scale.detach()), abs=1e-6
    )
    assert not (tmp_path / "resumed" / "out" / "checkpoint-epoch-1").exists()  # epoch 1 was not run again


class _WorkerDied(RuntimeError):
    pass


def _dies_after(batches, count):
    """Batches that stop with an error after ``count`` of them: a worker lost mid-epoch."""
    yield from batches[:count]
    raise _WorkerDied


def test_a_run_resumed_mid_epoch_draws_the_same_dropout_and_loss_scale_as_an_uninterrupted_one(
    tiny_clip_dir, shapes_small, tmp_path
):
    # LoRA dropout makes every step random. The run dies in epoch 2 after its first micro-batch (the data loader
    # looks one batch ahead) and is resumed from its state at that point; the weights must equal an uninterrupted
    # run's. The dropout RNG was reseeded at epoch start only, so the resumed steps drew other masks.
    batches = _collated(shapes_small["train"], tiny_clip_dir, batch_size=8)  # 3 per epoch

    def make(out, data):
        cfg = _config(tiny_clip_dir, tmp_path / out, epochs=2, learning_rate=1e-2, use_lora=True, lora_dropout=0.5)
        torch.manual_seed(0)
        model = apply_lora(build_model(cfg), cfg)
        criterion = LossFactory.create(cfg)
        optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
        return Trainer(model, optimizer, data, criterion, config=cfg)

    class Epochs:
        """Epoch 1 in full, then epoch 2 dies after two batches."""

        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(batches) if self.epoch == 0 else _dies_after(batches, 2)

    straight = make("straight", batches)
    straight.train()
    dying = make("dying", Epochs())
    with pytest.raises(_WorkerDied):
        dying.train()
    assert (dying.progress.epoch, dying.progress.batches_done, dying.progress.step) == (1, 1, 4)
    # fp16's GradScaler is part of the resume state (fp16 needs CUDA: a CPU scaler with a moved scale stands in).
    dying._scaler = torch.amp.GradScaler("cpu")
    scale_state = {
        "scale": 3.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 100,
        "_growth_tracker": 7,
    }
    dying._scaler.load_state_dict(scale_state)  # where 7 steps after two overflows leave a scaler
    written = save_training_state(
        tmp_path / "state", dying.model, dying.optimizer, None, dying.progress, dying._stateful_modules()
    )
    assert written

    resumed = make("resumed", batches)
    resumed._scaler = torch.amp.GradScaler("cpu")
    resumed.load_state(tmp_path / "state")
    assert resumed._scaler.state_dict() == scale_state
    resumed._scaler = None  # float32 training from here on, like the straight run
    resumed.train()
    assert resumed.progress.step == straight.progress.step == 6
    assert _max_diff(_weights(straight.model), _weights(resumed.model)) < 1e-6


def test_bad_trainer_setups_are_clear_errors(tiny_clip_dir, tmp_path):
    model = build_model(_config(tiny_clip_dir, tmp_path))
    criterion = LossFactory.create({})
    optimizer = build_optimizer(model, {})
    with pytest.raises(ValueError, match="no batches"):
        Trainer(model, optimizer, [], criterion, config=_config(tiny_clip_dir, tmp_path)).train()
    with pytest.raises(ValueError, match="grad_cache and gradient_accumulation_steps"):
        cfg = _config(tiny_clip_dir, tmp_path, grad_cache=True, gradient_accumulation_steps=2)
        Trainer(model, optimizer, [], criterion, config=cfg)
    with pytest.raises(ValueError, match="set loss_type: distillation"):
        Trainer(model, optimizer, [], criterion, config=_config(tiny_clip_dir, tmp_path, teacher_model_name="x"))
