"""Checks a training run makes before Ray starts: every model and data path it names exists.

A missing path then fails in a second with a ``ConfigError`` naming the key, instead of a worker traceback after
Ray and the data pipeline have started. Only the standard library and :mod:`vembed.modelpath` are imported, so the
command line can call it before importing torch or Ray.
"""

from __future__ import annotations

from pathlib import Path

from vembed.config import ConfigError, VEmbedConfig
from vembed.modelpath import resolve_source
from vembed.training.tracking import check_trackers

MODEL_KEYS = ("model_name", "text_model_name", "image_model_name", "teacher_model_name")
DATA_KEYS = ("data_path", "val_data_path")


def check_sources(config: VEmbedConfig) -> None:
    """Raise a ``ConfigError`` naming the key when a model or local data path of ``config`` does not exist
    (URIs such as ``s3://`` are left to the readers), or when no training data is set."""
    for key in MODEL_KEYS:
        value = getattr(config, key)
        if value is not None:
            try:
                resolve_source(value)
            except FileNotFoundError as exc:
                raise ConfigError(f"{key}: {exc}") from exc
    if config.data_path is None:
        raise ConfigError("data_path is not set: give the training records (JSONL / CSV / Parquet)")
    try:
        check_trackers(config.report_to)
    except ImportError as exc:
        raise ConfigError(str(exc)) from exc
    for key in DATA_KEYS:
        value = getattr(config, key)
        if value is not None and "://" not in value and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}: no such file or folder: {value}")
