"""A single training worker replays its later epochs from its own memory instead of running Ray Data again.

With one training worker, every preprocessed row of the data set passes through that worker in every epoch. When
the rows fit a budget (``cache_preprocessed``, sized by :func:`~vembed.data.pipeline.cache_budget`), the worker
keeps the rows of the first epoch it streams, keyed by their record's source, and builds each later epoch's
batches itself: the epoch's records in the order a Ray Data execution of that epoch yields them
(:meth:`~vembed.data.pipeline.RecordDatasource.records_for_epoch`; records are paths and texts, so listing them is
cheap), each replaced by its kept row, through the same shuffle buffer and batching
(:func:`~vembed.data.pipeline.batches_of_rows`).

Why: a cached epoch run through Ray Data still starts an execution, runs a preprocessing task per block (cache
lookups, object-store reads and copies), and feeds the worker through Ray Data's split coordinator and iterator
threads. On a small node those processes' CPU comes out of the training threads; replaying from the worker's
memory wakes no other process at all.

The batches are the streaming ones: the same rows in the same order. A record without a kept row was dropped as
bad when it streamed; a replayed epoch preprocesses it again, in the worker, and counts it again (or trains on it,
if it has been fixed meanwhile), as a streaming epoch would. A worker that restarts (after a failure, or a resumed
run) streams its first epoch again and replays from the next. With several workers each rank gets other rows in
every epoch (Ray Data's split), so they do not replay; their preprocessing tasks share the object-store cache
(:class:`~vembed.data.run_state.PreprocessedCache`) instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from vembed.config import VEmbedConfig, as_config
from vembed.data.pipeline import (
    ROW_SOURCE_KEY,
    RecordDatasource,
    batches_of_rows,
    preprocess_record_rows,
    record_source,
)
from vembed.data.records import SOURCE_FIELD
from vembed.data.run_state import BadRecordCounter, batch_nbytes


class EpochReplay:
    """The rows a worker streamed in one whole epoch, and later epochs' batches made from them.

    Give :meth:`keep` to :func:`~vembed.data.pipeline.iter_train_batches` while an epoch streams and call
    :meth:`epoch_streamed` once it has delivered its last batch; from then on, :attr:`ready` says whether the
    epoch fitted ``budget_bytes`` and :meth:`batches` makes any later epoch. ``bad_records`` counts the records a
    replayed epoch drops again; ``preprocessor`` preprocesses them (by default the one ``cfg`` names, loaded when
    a replayed epoch first needs it).
    """

    def __init__(
        self,
        cfg: VEmbedConfig | Mapping[str, Any],
        budget_bytes: float,
        bad_records: BadRecordCounter | None = None,
        preprocessor: Any | None = None,
    ) -> None:
        self._cfg = as_config(cfg)
        self._budget = budget_bytes
        self._bad_records = bad_records
        self._rows: dict[str, tuple[dict[str, np.ndarray], int]] = {}  # record source -> (arrays, row)
        self._bytes = 0
        self._cannot_replay = False
        self._streamed = False
        self._lock = threading.Lock()  # an epoch may stream in a background thread (the worker's next epoch)
        self._source: RecordDatasource | None = None
        self._preprocessor = preprocessor

    @property
    def ready(self) -> bool:
        """True once a whole epoch streamed and its rows fitted the budget: later epochs can replay."""
        return self._streamed and not self._cannot_replay

    @property
    def nbytes(self) -> int:
        """Bytes of the rows kept."""
        return self._bytes

    def keep(self, batch: Mapping[str, np.ndarray]) -> None:
        """Keep a copy of a streamed block's rows (nothing once the epoch's rows have outgrown the budget)."""
        if self._cannot_replay or self._streamed or not any(len(values) for values in batch.values()):
            return
        nbytes = batch_nbytes(batch)
        with self._lock:
            if self._bytes + nbytes > self._budget or ROW_SOURCE_KEY not in batch:
                # too large (or rows that do not say which record they are): every epoch streams; free what was kept
                self._cannot_replay = True
                self._rows.clear()
                self._bytes = 0
                return
            self._hold({column: _owned_copy(values) for column, values in batch.items()}, nbytes)

    def _hold(self, batch: dict[str, np.ndarray], nbytes: int) -> None:
        """Index the rows of ``batch`` (arrays this object owns) by their record's source."""
        self._bytes += nbytes
        for row, source in enumerate(batch[ROW_SOURCE_KEY]):
            self._rows[str(source)] = (batch, row)

    def epoch_streamed(self) -> None:
        """The epoch :meth:`keep` saw has delivered all its rows."""
        self._streamed = True

    def batches(self, epoch: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Epoch ``epoch``'s training batches, as :func:`~vembed.data.pipeline.iter_train_batches` would stream
        them (requires :attr:`ready`)."""
        if not self.ready:
            raise RuntimeError("EpochReplay.batches needs a whole streamed epoch that fitted the budget")
        if self._source is None:
            self._source = record_source(self._cfg.data_path, self._cfg)
        order = []
        missing = []
        for record in self._source.records_for_epoch(epoch):
            order.append(record[SOURCE_FIELD])
            if record[SOURCE_FIELD] not in self._rows:
                missing.append(record)
        if missing:
            self._preprocess_again(missing)
        rows = [self._rows[source] for source in order if source in self._rows]
        return batches_of_rows(rows, batch_size, self._cfg, epoch)

    def _preprocess_again(self, records: list[dict[str, Any]]) -> None:
        """Records dropped when they streamed: preprocess them as a streaming epoch would, count the ones still
        bad, keep the rows of any that are good now."""
        if self._preprocessor is None:
            from vembed.data.processing import Preprocessor

            self._preprocessor = Preprocessor.from_config(self._cfg)
        cfg = self._cfg
        batch, bad = preprocess_record_rows(records, self._preprocessor, cfg.retrieval_mode, cfg.on_bad_record)
        if bad and self._bad_records is not None:
            self._bad_records.add(bad)
        if batch:
            self._hold(batch, batch_nbytes(batch))


def _owned_copy(values: np.ndarray) -> np.ndarray:
    """A copy of ``values`` that owns its memory (Ray hands out read-only views of its object store)."""
    if values.dtype != object:
        return np.array(values, copy=True)
    out = np.empty(len(values), dtype=object)
    for index, item in enumerate(values):
        out[index] = np.array(item, copy=True) if isinstance(item, np.ndarray) else item
    return out
