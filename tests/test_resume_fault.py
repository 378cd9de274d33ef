"""Resume and fault tolerance on real Ray Train runs.

- A run stopped after epoch 1 and started again with the same storage path and run name continues at epoch 2 and
  ends with the weights of an uninterrupted run (same seed; the uninterrupted reference runs in this process).
- A worker that kills itself mid-epoch (``fail_at_step``) is replaced; the run resumes from the last checkpoint
  (mid-epoch: the data position is restored) and finishes with the right step count and the weights of the same
  run left uninterrupted -- with shuffling and LoRA dropout on, so the data order of every epoch and the dropout
  masks after the restart must be those of the uninterrupted run; a record whose image is missing is skipped and
  counted.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from vembed.data.dataset import VisualRetrievalDataset
from vembed.losses.factory import LossFactory
from vembed.model import EmbeddingModel
from vembed.testing import make_shapes_dataset
from vembed.training.config import as_config
from vembed.training.launcher import run_training
from vembed.training.model_builder import build_model, load_processor
from vembed.training.optimizer_builder import build_optimizer, build_scheduler
from vembed.training.training_loop import Trainer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes16"), num_train=16, num_val=0, num_test=0, seed=5)


def _config(tiny_clip_dir, data_path, out, **overrides):
    return as_config(
        {
            "model_name": str(tiny_clip_dir),
            "data_path": str(data_path),
            "output_dir": str(out),
            "batch_size": 8,
            "num_workers": 1,
            "torch_threads": 1,
            # AdamW with eps = 1 is momentum SGD for these gradients: the comparison with the in-process reference
            # then sees real differences (lost optimizer state) and not float noise that Adam's g / sqrt(v)
            # blows up for near-zero gradients.
            "learning_rate": 0.5,
            "adam_epsilon": 1.0,
            "scheduler_type": "constant",  # the stopped run has epochs=1: a decaying schedule would differ
            "mixed_precision": "no",
            "logging_steps": 1,
            "shuffle": False,  # file order, so that the in-process reference sees the same batches
            **overrides,
        }
    )


def _uninterrupted_reference(cfg, data_path, epochs):
    """The same training in one process without Ray: records in file order (shuffle off), batches of 8."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    criterion = LossFactory.create(cfg)
    optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
    dataset = VisualRetrievalDataset(data_path, load_processor(cfg.model_name))
    batches = list(DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=dataset.collator()))
    scheduler, _ = build_scheduler(optimizer, cfg, epochs, len(batches))
    trainer = Trainer(model, optimizer, batches, criterion, config=cfg.replace(epochs=epochs), scheduler=scheduler)
    trainer.train()
    return model.state_dict()


def test_rerun_with_the_same_name_resumes_at_epoch_2_and_matches_an_uninterrupted_run(
    ray_local, tiny_clip_dir, shapes16, tmp_path
):
    out = tmp_path / "stopped"
    first = run_training(_config(tiny_clip_dir, shapes16["train"], out, epochs=1))
    assert (first.metrics["epoch"], first.metrics["step"]) == (1, 2)
    epoch1_file = out / "checkpoint-epoch-1" / "vembed.json"
    written = epoch1_file.stat().st_mtime_ns

    second = run_training(_config(tiny_clip_dir, shapes16["train"], out, epochs=2))
    assert second.error is None
    assert (second.metrics["epoch"], second.metrics["step"]) == (2, 4)
    assert epoch1_file.stat().st_mtime_ns == written, "epoch 1 must not run again"
    with second.checkpoint.as_directory() as directory:
        assert json.loads(open(f"{directory}/trainer_state.json").read())["epoch"] == 2

    reference_cfg = _config(tiny_clip_dir, shapes16["train"], tmp_path / "reference")
    expected = _uninterrupted_reference(reference_cfg, shapes16["train"], epochs=2)
    got = EmbeddingModel.from_pretrained(out / "checkpoint-epoch-2").state_dict()
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) < 1e-5


def test_a_killed_worker_is_replaced_and_the_run_continues_as_if_uninterrupted(ray_local, tiny_clip_dir, tmp_path):
    data = make_shapes_dataset(tmp_path / "data", num_train=32, num_val=0, num_test=0, seed=6)
    records = [json.loads(line) for line in data["train"].read_text().splitlines()]
    records[7]["positive"] = str(tmp_path / "missing.jpg")  # skipped and counted (on_bad_record: skip)
    data["train"].write_text("".join(json.dumps(r) + "\n" for r in records))

    def config(out, **overrides):
        return _config(
            tiny_clip_dir,
            data["train"],
            out,
            epochs=2,
            num_workers=2,
            save_steps=2,
            shuffle=True,
            use_lora=True,
            lora_dropout=0.5,
            **overrides,
        )

    cfg = config(tmp_path / "out", fail_at_step=3, max_failures=1)
    result = run_training(cfg)

    assert result.error is None
    # 31 good records split equally over 2 workers: 15 each, 3 batches of 4 per epoch, 2 epochs.
    assert result.metrics["step"] == 6
    assert result.metrics["bad_records"] >= 1
    markers = list((tmp_path / "out" / "ray_results").rglob(".fail_at_step_3.done"))
    assert markers, "the worker must really have been killed once"
    assert (tmp_path / "out" / "checkpoint-step-2").is_dir() and (tmp_path / "out" / "checkpoint-epoch-2").is_dir()

    uninterrupted = run_training(config(tmp_path / "uninterrupted", max_failures=0))
    assert uninterrupted.error is None and uninterrupted.metrics["step"] == 6
    expected = EmbeddingModel.from_pretrained(tmp_path / "uninterrupted" / "checkpoint-epoch-2").state_dict()
    got = EmbeddingModel.from_pretrained(tmp_path / "out" / "checkpoint-epoch-2").state_dict()
    start = EmbeddingModel.from_pretrained(tiny_clip_dir).state_dict()
    assert max(float((expected[k] - start[k]).abs().max()) for k in expected) > 1e-3
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst < 1e-5, f"the resumed run ends {worst:.3g} away from the uninterrupted one"
