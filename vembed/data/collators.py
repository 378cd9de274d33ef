"""The default torch collate function: records in, a dict of torch tensors in the model's batch layout out.

It wraps :func:`vembed.data.batching.build_batch`, the same function the Ray Data pipeline runs, so a custom
``DataLoader`` loop and Ray training see identical inputs. Find it by name with
``CollatorRegistry.get("default")`` (:mod:`vembed.data.registry`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vembed.data.batching import BadRecord, BadRecordError, build_batch, check_bad_record_policy
from vembed.data.records import check_retrieval_mode

DATASET_MODES = ("train", "eval")


def check_dataset_mode(mode: str) -> str:
    """Return ``mode`` if it is ``"train"`` or ``"eval"``, else raise a ValueError saying so."""
    if mode not in DATASET_MODES:
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r} (the retrieval mode is 'retrieval_mode')")
    return mode


class DefaultCollator:
    """Collate records into ``{key: torch.Tensor}`` (layout: :mod:`vembed.data.batching`).

    Args:
        processor: the :class:`~vembed.data.processing.Preprocessor` from ``load_processor``.
        mode: ``"train"`` loads hard negatives; ``"eval"`` ignores them (retrieval is scored against the pool).
        retrieval_mode: t2i, i2i, i2t, t2t, m2i or m2t.
        image_root: directory or URI for relative image paths (records from a VisualRetrievalDataset are resolved).
        on_bad_record: ``"skip"`` drops bad records (the batch gets smaller; :attr:`bad_records` lists them),
            ``"fail"`` raises :class:`~vembed.data.batching.BadRecordError`.

    :attr:`bad_records` only sees batches collated in this process (``DataLoader(num_workers=0)``); bad records
    are also logged as warnings wherever they are found.
    """

    def __init__(
        self,
        processor: Any,
        mode: str = "train",
        retrieval_mode: str = "t2i",
        image_root: str | None = None,
        on_bad_record: str = "skip",
    ) -> None:
        self.processor = processor
        self.mode = check_dataset_mode(mode)
        self.retrieval_mode = check_retrieval_mode(retrieval_mode)
        self.image_root = image_root
        self.on_bad_record = check_bad_record_policy(on_bad_record)
        self.bad_records: list[BadRecord] = []

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch, bad = build_batch(
            records,
            self.processor,
            self.retrieval_mode,
            image_root=self.image_root,
            on_bad_record=self.on_bad_record,
            with_negatives=self.mode == "train",
        )
        self.bad_records.extend(bad)
        if not batch:
            raise BadRecordError(
                f"all {len(records)} records of this batch are bad (first: {bad[0].source}: {bad[0].error}); "
                "check image paths, image_root and retrieval_mode"
            )
        return {key: torch.from_numpy(value) for key, value in batch.items()}
