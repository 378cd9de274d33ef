"""High-level API: :class:`VEmbedFactoryTrainer` trains and evaluates in two calls.

    trainer = VEmbedFactoryTrainer("openai/clip-vit-base-patch32")
    trainer.train("data/train.jsonl", "output", epochs=3)      # Ray TorchTrainer; writes output/checkpoint-epoch-N
    metrics = trainer.evaluate("data/test.jsonl")              # retrieval metrics of the latest checkpoint

Every keyword is a key of ``configs/defaults.yaml`` (validated once, here); ``train()`` keywords override the
constructor's for that run. Training runs on the connected Ray cluster (``RAY_ADDRESS``), else a local instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vembed.config import VEmbedConfig, as_config, load_config_file


class VEmbedFactoryTrainer:
    """Fine-tune an embedding model with vembed's defaults, overridable per keyword.

    Args:
        model_name_or_path: hub id or local directory of the model to fine-tune (any supported family).
        learning_rate, batch_size, scheduler_type, warmup_ratio: the most used settings (None keeps the default).
        config: a YAML config file or a dict of settings applied before the keywords.
        **overrides: any other configuration key (``use_lora=True``, ``loss_type="sigmoid"``, ``num_workers=2``...).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        scheduler_type: str | None = None,
        warmup_ratio: float | None = None,
        config: str | os.PathLike | Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        base = load_config_file(config) if isinstance(config, (str, os.PathLike)) else as_config(config)
        named = dict(
            learning_rate=learning_rate, batch_size=batch_size, scheduler_type=scheduler_type, warmup_ratio=warmup_ratio
        )
        settings = {k: v for k, v in named.items() if v is not None}
        self.config: VEmbedConfig = base.replace(model_name=str(model_name_or_path), **settings, **overrides)
        self.result: Any = None
        self.last_checkpoint: Path | None = None

    def train(
        self,
        data_path: str | os.PathLike,
        output_dir: str | os.PathLike,
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        val_data_path: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> Any:
        """Train on ``data_path`` and write ``output_dir/checkpoint-epoch-N``; returns the ``ray.train.Result``.

        ``epochs`` (default 3), ``batch_size`` (32, global) and ``learning_rate`` (1e-5) fall back to what the
        constructor (or the config) set; other keywords are configuration keys for this run.

        Raises:
            ray.train.TrainingFailedError: the run failed after ``max_failures`` restarts.
        """
        from vembed.training.launcher import run_training

        named = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)
        run_config = self.config.replace(
            data_path=str(data_path),
            output_dir=str(output_dir),
            val_data_path=str(val_data_path) if val_data_path is not None else self.config.val_data_path,
            **{k: v for k, v in named.items() if v is not None},
            **overrides,
        )
        self.result = run_training(run_config)
        self.last_checkpoint = latest_user_checkpoint(Path(output_dir))
        return self.result

    def evaluate(self, data_path: str | os.PathLike, batch_size: int = 32, **options: Any) -> dict[str, Any]:
        """Retrieval metrics (recall@K, ndcg@K, mrr, map, ...) of the latest trained checkpoint on ``data_path``.

        Before any training, the starting model is evaluated (its zero-shot quality). ``options`` go to
        :func:`vembed.evaluation.evaluator.evaluate_model_path` (``ks``, ``mrl_dims``, ``mode``...).
        """
        from vembed.evaluation.evaluator import evaluate_model_path

        cfg = self.config
        model = self.last_checkpoint or cfg.model_name
        options.setdefault("mode", cfg.retrieval_mode)
        options.setdefault("image_root", cfg.image_root)
        options.setdefault("column_mapping", cfg.column_mapping or None)
        options.setdefault("mrl_dims", cfg.mrl_dims)
        return evaluate_model_path(model, data_path, batch_size=batch_size, **options)


def latest_user_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-epoch-N`` (else ``checkpoint-step-N``) under ``output_dir``."""
    for prefix in ("checkpoint-epoch-", "checkpoint-step-"):
        found = [p for p in output_dir.glob(f"{prefix}*") if p.name[len(prefix) :].isdigit()]
        if found:
            return max(found, key=lambda p: int(p.name[len(prefix) :]))
    return None
