"""The Ray Data training pipeline: record files -> preprocessed rows that every Train worker streams batches from.

Stages; every one streams, so the data set may be far larger than memory::

    RecordDatasource   read JSONL / CSV / Parquet (local or pyarrow URI) with vembed's own parser and schema into
                       normalised record rows (a malformed line fails naming file and line). With ``shuffle: true``
                       the file order and the records inside windows of RECORD_SHUFFLE_WINDOW records are permuted
                       by (seed, epoch) -- records are paths and texts, so a window costs a few MB. The epoch is
                       read from an :class:`EpochClock` when each epoch's execution starts
    map_batches        in Ray Data tasks: read + decode images, resize/normalise, tokenise with
                       :func:`~vembed.data.batching.build_batch` (the function the torch collator uses); texts are
                       padded to ``max_text_length`` so all blocks share one shape; bad records are dropped and
                       counted (:class:`BadRecordCounter`) or fail the job (``on_bad_record: fail``). Tasks, not an
                       actor pool: Ray reuses its worker processes across tasks, epochs and runs, so torch and the
                       preprocessor are loaded once per process (:class:`PickledPreprocessor`), whereas every
                       execution (every epoch) of an actor stage starts new actors. ``preprocess_tasks`` caps how
                       many run at once. With a :class:`PreprocessedCache` (``cache_preprocessed``, sized by
                       :func:`cache_budget`) the tasks look every record up first and reuse the row an earlier
                       epoch made: the read stage and its (seed, epoch) order are unchanged, so cached epochs yield
                       the streaming batches, and records past the cache's budget stream as before. Every row
                       carries its record's source (:data:`ROW_SOURCE_KEY`)

In each Train worker, :func:`iter_train_batches` turns ``ray.train.get_dataset_shard("train")`` into equal-sized
torch batches in the model's layout (``drop_last=True``) and trims the text padding back to the batch's longest
text (:func:`collate_train_batch`); with ``shuffle: true`` rows pass through a shuffle buffer seeded by (seed,
epoch) first (:func:`batches_of_rows`). The rows arrive in the read stage's order, so an epoch's batches are a
function of (seed, epoch) and the records alone, and :meth:`RecordDatasource.records_for_epoch` computes that
order in-process: a single worker replays later epochs from memory with exactly the streaming batches
(:mod:`vembed.data.epoch_replay`).

Every random choice is seeded by (seed, epoch) and nothing by how many times the data set has run, so a run
resumed at epoch N (a new driver, or Train workers restarted after a failure) sees the same batches as an
uninterrupted one. The data set cannot know which epoch a Train worker is in -- Ray Train executes it once per
epoch, counting from 0 again after every restart -- so the workers tell it: :func:`iter_train_batches` sets the
run's :class:`EpochClock` before it starts an epoch, and every rank has set the same epoch before Ray Data's
``streaming_split`` starts that epoch's execution (it waits for all ranks). Ray Train replaces a dataset's
execution options with its own, so pass ``DataConfig(execution_options=train_ingest_options())`` to keep the order
fixed under Train.
A data set stored sorted (by class, say) in one file is only shuffled within windows: write it shuffled, or as
many files.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray import cloudpickle
from ray.data.datasource import FileBasedDatasource

from vembed.config import VEmbedConfig, as_config
from vembed.data.batching import FIXED_TEXT_LENGTH_KEY, BadRecord, build_batch, trim_text_padding
from vembed.data.ragged import collate_rows, is_vlm_batch, tensor_copy
from vembed.data.readers import RECORD_EXTENSIONS, first_record, parse_record_file, resolve_record_files
from vembed.data.records import SOURCE_FIELD, RecordSchema
from vembed.data.run_state import BadRecordCounter, EpochClock, PreprocessedCache, batch_nbytes

RECORD_BLOCK_ROWS = 256
"""Records per block read from a file (a block is the unit one preprocessing task works on)."""
MAX_READ_TASKS = 256
"""Most read tasks of one data set: one per file up to this, then several files per task. A file is never split
across tasks, and its blocks are never split further, so preprocessing works on whole blocks."""
RECORD_SHUFFLE_WINDOW = 16384
"""Records permuted together when reading with ``shuffle: true`` (memory: records only, no pixels)."""
PREPROCESS_BATCH_ROWS = 32
"""Records per ``map_batches`` call: small enough that a block of pixels stays a few tens of MB."""
MIN_SHUFFLE_BUFFER_ROWS = 256
"""Smallest shuffle buffer (in preprocessed rows) of :func:`batches_of_rows`."""
ROW_SOURCE_KEY = "_record_source"
"""Column of every preprocessed row: the source (file and line) of its record, so a worker can tell its rows apart
(:class:`~vembed.data.epoch_replay.EpochReplay`); :func:`collate_train_batch` drops it."""

RECORD_ARROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("query", pa.string()),
        ("query_image", pa.string()),
        ("positive", pa.string()),
        ("negatives", pa.list_(pa.string())),
        ("label", pa.int64()),
        (SOURCE_FIELD, pa.string()),
    ]
)


CACHE_OBJECT_STORE_FRACTION = 0.25
"""Share of the cluster's object store that ``cache_preprocessed: auto`` may fill with preprocessed rows."""


def cache_budget(
    cfg: VEmbedConfig | Mapping[str, Any], num_records: int, preprocessor: Any, path: str | os.PathLike
) -> float | None:
    """Bytes of preprocessed rows to keep (``cache_preprocessed``), or None to stream every epoch.

    ``true``: no limit (the object store spills to disk when full). ``auto``: a quarter of the cluster's object
    store (:data:`CACHE_OBJECT_STORE_FRACTION`), and only when ``num_records`` rows of the size of the first
    record's fit into it -- larger data sets stream -- and the run has a later epoch to reuse them (a one-epoch run
    would pay for the cache's lookups and gain nothing). ``false``: None.
    """
    cfg = as_config(cfg)
    if cfg.cache_preprocessed is False or (cfg.cache_preprocessed == "auto" and cfg.epochs <= 1):
        return None
    if cfg.cache_preprocessed is True:
        return float("inf")
    budget = CACHE_OBJECT_STORE_FRACTION * ray.cluster_resources().get("object_store_memory", 0.0)
    schema = RecordSchema.from_config(cfg)
    record = first_record(path, schema)
    batch, _ = build_batch([record], preprocessor, cfg.retrieval_mode, on_bad_record="skip", pad_to_max_length=True)
    row_bytes = batch_nbytes(batch) if batch else 0
    return budget if row_bytes * num_records <= budget else None


def epoch_seed(seed: int, epoch: int, purpose: str) -> int:
    """A 32-bit seed for one random choice (``purpose``) of one epoch: the same in every process (sha256, not
    ``hash()``), and unrelated across seeds and epochs (``seed + epoch`` would make seed 3 epoch 1 = seed 4
    epoch 0)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class RecordDatasource(FileBasedDatasource):
    """Ray Data source of normalised records, parsed by :mod:`vembed.data.readers` and checked by a schema.

    One read task streams one or more files block by block; any schema problem raises
    :class:`~vembed.data.records.RecordError` naming file and line, which fails the job. With ``shuffle_seed``
    the files are read in an order seeded by (seed, epoch) and each file's records are permuted within windows
    of :data:`RECORD_SHUFFLE_WINDOW` by (seed, epoch, file), where the epoch is ``epoch_clock``'s when an
    execution starts (0 without a clock: the same order on every execution).
    """

    _FILE_EXTENSIONS = [ext.lstrip(".") for ext in RECORD_EXTENSIONS]

    def __init__(
        self,
        paths: str | list[str],
        record_schema: RecordSchema,
        shuffle_seed: int | None = None,
        epoch_clock: EpochClock | None = None,
        **file_based_kwargs: Any,
    ) -> None:
        super().__init__(paths, **file_based_kwargs)
        self._record_schema = record_schema
        self._shuffle_seed = shuffle_seed
        self._epoch_clock = epoch_clock
        self._epoch = 0

    def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> list[Any]:
        """Read tasks of one execution, for the epoch the clock shows now (called as each execution starts)."""
        if self._shuffle_seed is None:
            return super().get_read_tasks(parallelism, *args, **kwargs)
        epoch = self._epoch_clock.get() if self._epoch_clock is not None else 0
        epoch_source = self._for_epoch(epoch)  # the tasks pickle this copy: a later epoch cannot change a running one
        paths, sizes = self._paths(), self._file_sizes()
        order = self._file_order(epoch, len(paths))
        epoch_source._paths_ref = ray.put([paths[i] for i in order])
        epoch_source._file_sizes_ref = ray.put([sizes[i] for i in order])
        return FileBasedDatasource.get_read_tasks(epoch_source, parallelism, *args, **kwargs)

    def _for_epoch(self, epoch: int) -> RecordDatasource:
        epoch_source = copy.copy(self)
        epoch_source._epoch = epoch
        return epoch_source

    def _file_order(self, epoch: int, num_files: int) -> list[int]:
        """Indices of the ``num_files`` files in the order epoch ``epoch`` reads them (as listed without
        ``shuffle_seed``)."""
        order = list(range(num_files))
        if self._shuffle_seed is not None:
            random.Random(epoch_seed(self._shuffle_seed, epoch, "files")).shuffle(order)
        return order

    def records_for_epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The records of epoch ``epoch``, read in this process in the order an execution of that epoch yields them
        with ``preserve_order``: the same file order, windows and permutations as its read tasks."""
        epoch_source, paths = self._for_epoch(epoch), self._paths()
        for index in self._file_order(epoch, len(paths)):
            with self._filesystem.open_input_file(paths[index]) as f:
                for table in epoch_source._read_stream(f, paths[index]):
                    yield from table.to_pylist()

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # random access: Parquet reads its footer first

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        # A string seed hashes the same in every process (sha512), unlike hash(); one generator per file, created
        # here, so a retried read replays exactly the same permutation.
        rng = None if self._shuffle_seed is None else random.Random(f"{self._shuffle_seed}:{self._epoch}:{path}")
        window_size = RECORD_SHUFFLE_WINDOW if rng is not None else RECORD_BLOCK_ROWS
        window: list[dict[str, Any]] = []
        for raw in parse_record_file(f, path):
            window.append(self._record_schema.normalize(raw))
            if len(window) == window_size:
                yield from _blocks(window, rng)
                window = []
        if window:
            yield from _blocks(window, rng)


def _blocks(rows: list[dict[str, Any]], rng: random.Random | None) -> Iterator[pa.Table]:
    if rng is not None:
        rng.shuffle(rows)
    for start in range(0, len(rows), RECORD_BLOCK_ROWS):
        yield pa.Table.from_pylist(rows[start : start + RECORD_BLOCK_ROWS], schema=RECORD_ARROW_SCHEMA)


_PREPROCESSORS_IN_THIS_PROCESS: OrderedDict[str, Any] = OrderedDict()
"""Unpickled preprocessors of this Ray worker process by content digest (tasks run in reused worker processes)."""
_MAX_CACHED_PREPROCESSORS = 4


class PickledPreprocessor:
    """A preprocessor shipped to Ray Data tasks as bytes and unpickled once per worker process.

    A tokenizer takes tens to hundreds of milliseconds to unpickle; every task gets these bytes, but only the first
    task in a process pays for :meth:`get`. The digest names the content, so equal preprocessors share one entry.
    """

    def __init__(self, preprocessor: Any) -> None:
        self.payload = cloudpickle.dumps(preprocessor)
        self.digest = hashlib.sha256(self.payload).hexdigest()

    def get(self) -> Any:
        """The preprocessor, from this process's cache when an earlier task already unpickled it."""
        cache = _PREPROCESSORS_IN_THIS_PROCESS
        if self.digest not in cache:
            cache[self.digest] = pickle.loads(self.payload)
            while len(cache) > _MAX_CACHED_PREPROCESSORS:
                cache.popitem(last=False)
        cache.move_to_end(self.digest)
        return cache[self.digest]


def preprocess_records(
    table: pa.Table,
    *,
    preprocessor: PickledPreprocessor,
    retrieval_mode: str,
    on_bad_record: str,
    bad_records: BadRecordCounter | None,
    cache: PreprocessedCache | None = None,
) -> dict[str, np.ndarray]:
    """``map_batches`` task function: a pyarrow batch of records -> model-input arrays, with this process's cached
    preprocessor (rows found in ``cache`` are reused, see :class:`PreprocessedCache`); dropped records go to
    ``bad_records``."""
    batch, bad = preprocess_record_rows(table.to_pylist(), preprocessor.get(), retrieval_mode, on_bad_record, cache)
    if bad and bad_records is not None:
        bad_records.add(bad)
    return batch  # an empty dict (every record bad) adds no rows


def preprocess_record_rows(
    records: list[dict[str, Any]],
    pre: Any,
    retrieval_mode: str,
    on_bad_record: str,
    cache: PreprocessedCache | None = None,
) -> tuple[dict[str, np.ndarray], list[BadRecord]]:
    """Normalised records -> the training set's rows (padded to ``max_text_length``, each with its record's
    source in :data:`ROW_SOURCE_KEY`) and the records dropped as bad; rows found in ``cache`` are reused."""
    if cache is None:
        batch, bad = build_batch(records, pre, retrieval_mode, on_bad_record=on_bad_record, pad_to_max_length=True)
    else:
        batch, bad = _through_cache(records, cache, pre, retrieval_mode, on_bad_record)
    if not batch:
        return {}, bad
    dropped = {b.source for b in bad}
    sources = [rec.get(SOURCE_FIELD, "") for rec in records]  # "": a record made by hand, not read from a file
    batch[ROW_SOURCE_KEY] = np.array([source for source in sources if source not in dropped])
    if getattr(pre, "text_padding", "longest") == "max_length":  # keep it: see trim_text_padding
        batch[FIXED_TEXT_LENGTH_KEY] = np.full(len(batch[ROW_SOURCE_KEY]), pre.max_text_length, dtype=np.int64)
    return batch, bad


def _through_cache(
    records: list[dict[str, Any]], cache: PreprocessedCache, pre: Any, retrieval_mode: str, on_bad_record: str
) -> tuple[dict[str, np.ndarray], list[BadRecord]]:
    """:func:`build_batch` of ``records``, its rows taken from ``cache`` where present (the misses are
    preprocessed and offered to the cache): the same arrays and dropped records as without a cache."""
    keys = [rec[SOURCE_FIELD] for rec in records]
    found = cache.lookup(keys)
    held = {entry[0][0].hex(): entry[0][0] for entry in found if entry is not None and entry[0] is not None}
    try:
        arrays = dict(zip(held, ray.get(list(held.values())), strict=True))
    except ray.exceptions.RayError:  # a cached object was lost: preprocess these records again
        found, arrays = [None] * len(records), {}
    missing = [rec for rec, entry in zip(records, found, strict=True) if entry is None]
    fresh, fresh_bad = {}, []
    if missing:
        fresh, fresh_bad = build_batch(
            missing, pre, retrieval_mode, on_bad_record=on_bad_record, pad_to_max_length=True
        )
        dropped = {b.source for b in fresh_bad}
        cache.add([rec[SOURCE_FIELD] for rec in missing if rec[SOURCE_FIELD] not in dropped], fresh, fresh_bad)
    rows: list[tuple[Mapping[str, np.ndarray], int]] = []  # (arrays, row) of every kept record, in record order
    bad: list[BadRecord] = []
    fresh_bad_by_key = {b.source: b for b in fresh_bad}
    next_fresh = 0
    for key, entry in zip(keys, found, strict=True):
        if entry is None and key in fresh_bad_by_key:
            bad.append(fresh_bad_by_key[key])
        elif entry is None:
            rows.append((fresh, next_fresh))
            next_fresh += 1
        elif entry[0] is None:
            bad.append(BadRecord(*entry[1]))
        else:
            rows.append((arrays[entry[0][0].hex()], entry[1]))
    if not rows:
        return {}, bad
    return {column: gather_column(column, rows) for column in rows[0][0]}, bad


def gather_column(column: str, rows: list[tuple[Mapping[str, np.ndarray], int]]) -> np.ndarray:
    """One column of the rows ``(arrays, index)``, in order (object columns -- ragged VLM rows -- stay objects)."""
    if rows[0][0][column].dtype == object:
        out = np.empty(len(rows), dtype=object)
        for position, (arrays, index) in enumerate(rows):
            out[position] = arrays[column][index]
        return out
    return np.stack([arrays[column][index] for arrays, index in rows])


def shuffle_seed(cfg: VEmbedConfig | Mapping[str, Any]) -> int:
    """``shuffle_seed``, or ``seed`` when it is null."""
    cfg = as_config(cfg)
    return cfg.shuffle_seed if cfg.shuffle_seed is not None else cfg.seed


def read_record_dataset(
    path: str | os.PathLike, cfg: VEmbedConfig | Mapping[str, Any], epoch_clock: EpochClock | None = None
) -> ray.data.Dataset:
    """Normalised records at ``path`` (file, directory or URI) as a Ray Dataset, schema and shuffling from ``cfg``
    (reshuffled for the epoch ``epoch_clock`` shows when an execution starts).

    The layout (number of negatives, labels or not) is fixed from the first record, read here in the driver, so an
    empty data set fails now with :class:`~vembed.data.readers.EmptyDatasetError` rather than inside a worker.
    """
    source = record_source(path, cfg, epoch_clock)
    return ray.data.read_datasource(source, override_num_blocks=min(len(source._paths()), MAX_READ_TASKS))


def record_source(
    path: str | os.PathLike, cfg: VEmbedConfig | Mapping[str, Any], epoch_clock: EpochClock | None = None
) -> RecordDatasource:
    """The :class:`RecordDatasource` of :func:`read_record_dataset` (its schema and shuffling from ``cfg``)."""
    cfg = as_config(cfg)
    filesystem, files = resolve_record_files(path)
    schema = RecordSchema.from_config(cfg)
    schema = schema.with_layout_of(first_record(path, schema))
    seed = shuffle_seed(cfg) if cfg.shuffle else None
    return RecordDatasource(files, schema, shuffle_seed=seed, epoch_clock=epoch_clock, filesystem=filesystem)


def build_train_dataset(
    path: str | os.PathLike,
    preprocessor: Any,
    cfg: VEmbedConfig | Mapping[str, Any],
    bad_records: BadRecordCounter | None = None,
    epoch_clock: EpochClock | None = None,
    cache: PreprocessedCache | None = None,
) -> ray.data.Dataset:
    """The training Dataset: rows in the model's batch layout (see :mod:`vembed.data.batching`), one per record.

    Args:
        path: record file, directory or pyarrow URI.
        preprocessor: the model's :class:`~vembed.data.processing.Preprocessor` (shipped to the Data tasks).
        cfg: reads ``retrieval_mode``, ``column_mapping``, ``image_root``, ``on_bad_record``, ``shuffle``,
            ``shuffle_seed``/``seed`` and ``preprocess_tasks`` (``max_text_length`` is the preprocessor's).
        bad_records: counts records dropped under ``on_bad_record: skip`` (they are logged either way).
        epoch_clock: with ``shuffle: true``, the file and window orders of each execution are those of the epoch
            it shows (give the same clock to :func:`iter_train_batches`); without one they stay those of epoch 0.
        cache: reuse the rows preprocessed in earlier executions (see :class:`PreprocessedCache` and
            :func:`cache_budget`); None preprocesses every record in every execution.

    Text columns are padded to ``preprocessor.max_text_length``; consume the dataset with
    :func:`iter_train_batches` (or ``iter_torch_batches(collate_fn=collate_train_batch)``) to get batches padded
    to their longest text.
    """
    cfg = as_config(cfg)
    ds = read_record_dataset(path, cfg, epoch_clock).map_batches(
        preprocess_records,
        fn_kwargs={
            "preprocessor": PickledPreprocessor(preprocessor),
            "retrieval_mode": cfg.retrieval_mode,
            "on_bad_record": cfg.on_bad_record,
            "bad_records": bad_records,
            "cache": cache,
        },
        batch_size=PREPROCESS_BATCH_ROWS,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=cfg.preprocess_tasks),
    )
    ds.context.execution_options.preserve_order = True  # reproducible when iterated directly
    return ds


def train_ingest_options() -> ray.data.ExecutionOptions:
    """Ray Data options for Train ingest: the driver's defaults (as Train's own) plus ``preserve_order=True``.

    Pass them as ``ray.train.DataConfig(execution_options=train_ingest_options())``: with the seeded shuffles of
    this module, every run with the same seed, data and worker count then sees the same batches on every rank.
    """
    current = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=current.resource_limits,
        exclude_resources=current.exclude_resources,
        preserve_order=True,
        verbose_progress=current.verbose_progress,
    )


def collate_train_batch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``iter_torch_batches`` collate function: trim shared text padding, then numpy -> torch.

    Ray hands out read-only views of its object store; the tensors are copies the training step may modify.
    VLM rows (ragged per-row tokens, patches and grids) are padded and concatenated by
    :func:`vembed.data.ragged.collate_rows`.
    """
    batch = {key: value for key, value in batch.items() if key != ROW_SOURCE_KEY}
    if is_vlm_batch(batch):
        return collate_rows(batch)
    return {key: tensor_copy(value) for key, value in trim_text_padding(batch).items()}


def iter_train_batches(
    shard: ray.data.DataIterator | ray.data.Dataset,
    batch_size: int,
    cfg: VEmbedConfig | Mapping[str, Any],
    epoch: int = 0,
    prefetch_batches: int = 1,
    epoch_clock: EpochClock | None = None,
    keep: Callable[[Mapping[str, np.ndarray]], None] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of equal-sized training batches from a worker's shard (``ray.train.get_dataset_shard("train")``).

    ``batch_size`` is this worker's share of the global batch; the last partial batch is dropped so every step of
    every rank has the same size (contrastive losses need it). With ``shuffle: true`` this epoch's file and window
    orders are selected on ``epoch_clock`` (the data set's, see :func:`build_train_dataset`) and the rows pass
    through :func:`batches_of_rows`' shuffle buffer: a different, reproducible order each epoch. ``keep`` is called
    with every block of rows as it arrives (numpy arrays, read-only).
    """
    cfg = as_config(cfg)
    if cfg.shuffle and epoch_clock is not None:
        epoch_clock.set(epoch)
    blocks = shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_batches)

    def rows() -> Iterator[tuple[Mapping[str, np.ndarray], int]]:
        for block in blocks:
            if keep is not None:
                keep(block)
            yield from ((block, index) for index in range(len(next(iter(block.values()), ()))))

    return batches_of_rows(rows(), batch_size, cfg, epoch)


def batches_of_rows(
    rows: Iterable[tuple[Mapping[str, np.ndarray], int]],
    batch_size: int,
    cfg: VEmbedConfig | Mapping[str, Any],
    epoch: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches of ``batch_size`` rows (``(arrays, index)`` pairs, in the read stage's order), collated by
    :func:`collate_train_batch`; the partial last batch is dropped.

    With ``shuffle: true`` the rows first pass through a shuffle buffer of ``max(MIN_SHUFFLE_BUFFER_ROWS,
    4 * batch_size)`` rows seeded by (seed, epoch), which mixes rows across files and windows. The order it yields
    depends only on the order it is given and the seed, so streaming (:func:`iter_train_batches`) and replaying
    (:class:`~vembed.data.epoch_replay.EpochReplay`) the same rows give the same batches.
    """
    cfg = as_config(cfg)
    if cfg.shuffle:
        rng = random.Random(epoch_seed(shuffle_seed(cfg), epoch, "rows"))
        rows = _buffer_shuffled(rows, max(MIN_SHUFFLE_BUFFER_ROWS, 4 * batch_size), rng)
    chunk: list[tuple[Mapping[str, np.ndarray], int]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            columns = [column for column in chunk[0][0] if column != ROW_SOURCE_KEY]
            yield collate_train_batch({column: gather_column(column, chunk) for column in columns})
            chunk = []


def _buffer_shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """``items`` through a shuffle buffer of ``size``: once it is full, each new item swaps in for a random one,
    which is yielded; the rest come out shuffled at the end."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer
