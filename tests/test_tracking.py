"""Experiment tracking: ``report_to`` takes a list; TensorBoard event files hold the reported metrics at their
steps (read back with a plain TFRecord reader), and a tracker whose package is missing is a clear error."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vembed.config import ConfigError, as_config

pytestmark = pytest.mark.unit


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``: TFRecord framing (length, crc, payload, crc) + Event."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_report_to_accepts_a_list_a_name_or_none():
    assert as_config({"report_to": ["tensorboard", "mlflow"]}).report_to == ["tensorboard", "mlflow"]
    assert as_config({"report_to": "tensorboard"}).report_to == ["tensorboard"]
    assert as_config({"report_to": "none"}).report_to == []
    with pytest.raises(ConfigError, match="report_to"):
        as_config({"report_to": ["neptune"]})


def test_tensorboard_receives_every_report_at_its_step(tmp_path, tiny_bert_dir):
    pytest.importorskip("tensorboardX")
    from vembed.data.dataset import VisualRetrievalDataset
    from vembed.data.registry import CollatorRegistry
    from vembed.losses.factory import LossFactory
    from vembed.training.model_builder import build_model, load_processor
    from vembed.training.optimizer_builder import build_optimizer
    from vembed.training.training_loop import Trainer

    records = [{"id": str(i), "query": f"query {i}", "positive": f"document {i}"} for i in range(8)]
    config = {
        "model_name": str(tiny_bert_dir),
        "retrieval_mode": "t2t",
        "epochs": 2,
        "batch_size": 4,
        "logging_steps": 1,
        "output_dir": str(tmp_path / "out"),
        "report_to": ["tensorboard"],
    }
    torch.manual_seed(0)
    model = build_model(config)
    processor = load_processor(str(tiny_bert_dir))
    collate = CollatorRegistry.get("default")(processor=processor, mode="train", retrieval_mode="t2t")
    loader = DataLoader(
        VisualRetrievalDataset(records, processor, retrieval_mode="t2t"), batch_size=4, collate_fn=collate
    )
    trainer = Trainer(model, build_optimizer(model, config), loader, LossFactory.create(config), config=config)
    trainer.train()

    scalars = _scalars(tmp_path / "out" / "tensorboard")
    reported = {}
    for metrics in trainer.history:  # the loop's own record of each report
        reported[metrics["step"]] = metrics["loss"]
    assert sorted(reported) == [1, 2, 3, 4]
    logged = dict(scalars["train/loss"])  # an epoch-end report repeats its step's values
    assert sorted(logged) == [1, 2, 3, 4]
    for step, loss in reported.items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)
    assert [step for step, _ in scalars["train/lr"]][-1] == 4


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_missing_tracker_package_names_the_extra():
    from vembed.training.tracking import check_trackers

    with pytest.raises(ImportError, match=r"report_to: wandb needs the wandb package: pip install 'vembed\[wandb\]'"):
        check_trackers(["wandb"])
