"""``VisualRetrievalDataset``: validated records as a torch ``Dataset`` for ``DataLoader`` loops (seed guide §3).

Records are read and checked once, up front, so a schema problem fails at construction with file and line, not
halfway through an epoch. Items are the normalised record dicts; images are decoded and texts tokenised per batch
by the collator (``CollatorRegistry.get("default")`` or :meth:`VisualRetrievalDataset.collator`). Ray training
streams records through :mod:`vembed.data.pipeline` instead, with the same schema and batch builder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from vembed.config import as_config
from vembed.data.collators import DefaultCollator, check_dataset_mode
from vembed.data.readers import EmptyDatasetError, read_records
from vembed.data.records import SOURCE_FIELD, RecordSchema, normalize_records

DataSource = str | os.PathLike | Sequence[Mapping[str, Any]]


class VisualRetrievalDataset(Dataset):
    """Records of a retrieval data set (schema: :mod:`vembed.data.records`).

    Args:
        data_source: a JSONL / CSV / Parquet file, a directory of them, a pyarrow-filesystem URI, or a list of
            record dicts.
        processor: the :class:`~vembed.data.processing.Preprocessor` that :meth:`collator` batches with.
        mode: ``"train"`` keeps hard negatives; ``"eval"`` drops them (evaluation ranks against the pool).
        retrieval_mode: t2i, i2i, i2t, t2t, m2i or m2t: which fields are texts and which are images.
        column_mapping: renames the data set's columns to the schema's, e.g. ``{"caption": "query"}``.
        image_root: directory or URI that relative image paths are resolved against.
    """

    def __init__(
        self,
        data_source: DataSource,
        processor: Any,
        mode: str = "train",
        retrieval_mode: str = "t2i",
        column_mapping: Mapping[str, str] | None = None,
        image_root: str | None = None,
    ) -> None:
        self.processor = processor
        self.mode = check_dataset_mode(mode)
        schema = RecordSchema(retrieval_mode, column_mapping or {}, image_root)
        if isinstance(data_source, (str, os.PathLike)):
            records, schema = read_records(data_source, schema)
        else:
            records, schema = _normalize_in_memory(data_source, schema)
        if self.mode == "eval":
            records = [{**rec, "negatives": []} for rec in records]
        self.records: list[dict[str, Any]] = records
        self.schema: RecordSchema = schema

    @classmethod
    def from_config(
        cls, data_source: DataSource, processor: Any, config: Any, mode: str = "eval"
    ) -> VisualRetrievalDataset:
        """A data set read the way ``config`` says (``retrieval_mode``, ``column_mapping``, ``image_root``)."""
        cfg = as_config(config)
        return cls(data_source, processor, mode, cfg.retrieval_mode, cfg.column_mapping, cfg.image_root)

    @property
    def retrieval_mode(self) -> str:
        return self.schema.retrieval_mode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]

    def collator(self, on_bad_record: str = "skip") -> DefaultCollator:
        """The default collator for this data set's processor, mode and retrieval mode."""
        return DefaultCollator(
            self.processor, mode=self.mode, retrieval_mode=self.retrieval_mode, on_bad_record=on_bad_record
        )


def _normalize_in_memory(
    data: Sequence[Mapping[str, Any]], schema: RecordSchema
) -> tuple[list[dict[str, Any]], RecordSchema]:
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise TypeError(f"data_source must be a path, a URI or a list of record dicts, got {type(data).__name__}")
    labelled = [
        {**rec, SOURCE_FIELD: rec.get(SOURCE_FIELD) or f"data_source[{i}]"} if isinstance(rec, Mapping) else rec
        for i, rec in enumerate(data)
    ]
    for i, rec in enumerate(labelled):
        if not isinstance(rec, Mapping):
            raise TypeError(f"data_source[{i}] must be a record dict, got {type(rec).__name__}")
    normalized = list(normalize_records(labelled, schema))
    if not normalized:
        raise EmptyDatasetError("data_source is an empty list: the data set has no records")
    return [rec for rec, _ in normalized], normalized[-1][1]
