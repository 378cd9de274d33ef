"""Experiment tracking: ``report_to: [tensorboard, wandb, mlflow]`` (any subset; rank 0 only).

Each tracker receives the metrics of every report (``logging_steps``, validation, epoch end) at the optimizer step,
and the resolved configuration once. They are optional extras, checked before Ray starts
(:func:`check_trackers`) so a missing package is a one-line error rather than a failed worker:

- ``tensorboard``: event files under ``output_dir/tensorboard`` (``torch.utils.tensorboard`` with the
  ``tensorboard`` package, else ``tensorboardX``); ``pip install 'vembed[tensorboard]'``.
- ``wandb``: ``wandb.init(project=WANDB_PROJECT or "vembed", name=run_name, dir=output_dir, config=...)``;
  ``WANDB_MODE=offline`` keeps it local. ``pip install 'vembed[wandb]'``.
- ``mlflow``: a run in ``MLFLOW_TRACKING_URI`` (default ``output_dir/mlruns``, a local file store) named
  ``run_name``, with the configuration as params. ``pip install 'vembed[mlflow]'``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
EXTRAS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_trackers(report_to: Sequence[str]) -> None:
    """Raise an ``ImportError`` naming the extra to install when a requested tracker's package is missing."""
    for name in report_to:
        if not any(importlib.util.find_spec(module) for module in EXTRAS[name]):
            raise ImportError(f"report_to: {name} needs the {EXTRAS[name][0]} package: pip install 'vembed[{name}]'")


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, output_dir: Path, config: Mapping[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package; tensorboardX writes the same files
            from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "vembed"),
            name=config.get("run_name") or output_dir.name,
            dir=str(output_dir),
            config=dict(config),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, output_dir: Path, config: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=config.get("run_name") or output_dir.name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The trackers of ``report_to`` (none on ranks other than 0): ``log(metrics, step)``, ``close()``."""

    def __init__(self, report_to: Sequence[str], output_dir: str | Path, config: Mapping[str, Any], rank: int = 0):
        self.active: list[Any] = []
        if rank != 0:
            return
        check_trackers(report_to)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.active = [_CLASSES[name](output_dir, config) for name in report_to]

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Send the numeric values of ``metrics`` at optimizer step ``step`` to every tracker."""
        numbers = _numbers(metrics)
        for tracker in self.active:
            tracker.log(numbers, step)

    def close(self) -> None:
        for tracker in self.active:
            tracker.close()
        self.active = []
