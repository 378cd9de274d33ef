"""The output of a batch-embedding job: Parquet shards, error sidecars and ``_manifest.json``.

Layout (``DST`` is a local folder or any pyarrow-filesystem URI)::

    DST/_manifest.json               model, vembed.json hash, dim, normalisation, counts, runs, status
    DST/embeddings/part-00000.parquet  id, source, embedding (fixed-size list of float32 or float16)
                                     multi-vector models: embedding = list of such vectors, plus num_vectors
    DST/errors/part-00000.parquet      id, source, error   (only for shards that had bad records)
    DST/_fragments/part-00000/...      rows of unfinished shards, as the model actors produced them

Every file is written to a hidden temporary name and then moved into place, so a name that exists is complete.
A shard's errors file is written before its embeddings file, and the embeddings file (written even when it has no
rows) marks the shard done: a crash between the two only means the errors file is rewritten, identically, on rerun.
pyarrow and Ray Data skip hidden (``.``/``_``) files and folders, so ``pq.read_table("DST/embeddings")`` reads
finished shards only.

Writing happens on the workers (:class:`FragmentWriter`, run by every model actor on the rows it just embedded).
Rows arrive in any order and a shard's rows are spread over many actors, so each actor writes the rows it has of a
shard as a *fragment* (``_fragments/part-KKKKK/<first position>-<rows>-<digest>.parquet``, named by its rows, so a
retried task rewrites the same file) and then checks the shard's fragments: when their positions cover the shard
(counted from the names, confirmed from the ``position`` columns), that actor merges them -- sorted by position,
each position once, whatever duplicates retries or a crashed run left -- into the shard's files and removes the
fragments. Two actors finishing a shard at once write identical files (the rename is atomic); a rerun skips shards
whose embeddings file exists and keeps the fragments of the others. The finished shard's Parquet metadata records
the node that wrote it (``vembed.writer_node``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vembed.batch.shards import Shard
from vembed.batch.sources import Location, locate

MANIFEST_NAME = "_manifest.json"
EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"
FRAGMENTS_DIR = "_fragments"
#: Parquet schema metadata key of a finished shard: the Ray node id of the worker that wrote it
WRITER_NODE_KEY = b"vembed.writer_node"
NUMPY_FORMATS: dict[str, Any] = {"float32": np.float32, "float16": np.float16}
ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string())])


class OutputExistsError(FileExistsError):
    """The output folder holds results of a different job; the message says how to proceed."""


def embeddings_table(
    ids: np.ndarray, sources: np.ndarray, vectors: np.ndarray, fmt: str, num_vectors: np.ndarray | None = None
) -> pa.Table:
    """``id``, ``source`` and ``embedding`` as a fixed-size list of ``fmt`` (``float32`` or ``float16``).

    With ``num_vectors`` (multi-vector models) ``vectors`` holds each row's vectors packed by
    :func:`pack_vectors`, and the table gets ``embedding`` as a list of vectors plus ``num_vectors``
    (:func:`multi_vector_columns`).
    """
    if fmt not in NUMPY_FORMATS:
        raise ValueError(f"format={fmt!r} is not supported; use one of {sorted(NUMPY_FORMATS)}")
    if num_vectors is not None:
        embedding, counts = multi_vector_columns(vectors, num_vectors, fmt)
        columns = {"id": pa.array(ids, pa.string()), "source": pa.array(sources, pa.string())}
        return pa.table({**columns, "embedding": embedding, "num_vectors": counts})
    vectors = np.ascontiguousarray(vectors, dtype=NUMPY_FORMATS[fmt])
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [N, D], got shape {vectors.shape}")
    flat = pa.array(vectors.reshape(-1))
    embedding = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table(
        {"id": pa.array(ids, pa.string()), "source": pa.array(sources, pa.string()), "embedding": embedding}
    )


def pack_vectors(items: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Multi-vector items ``[L_i, D]`` -> (one float32 byte string per item, ``L_i`` per item): 1-D columns that
    stream through Ray Data batches and concatenate whatever the lengths (an empty item packs to ``b""``)."""
    packed = np.empty(len(items), dtype=object)
    packed[:] = [np.ascontiguousarray(x, dtype="<f4").tobytes() for x in items]
    return packed, np.array([len(x) for x in items], dtype=np.int32)


def multi_vector_columns(packed: np.ndarray, num_vectors: np.ndarray, fmt: str) -> tuple[pa.Array, pa.Array]:
    """Packed multi-vector rows (:func:`pack_vectors`) -> ``embedding`` (list of fixed-size ``fmt`` vectors) and
    ``num_vectors`` (int32) columns: the one place multi-vector rows are encoded for Parquet."""
    counts = np.asarray(num_vectors, dtype=np.int64)
    flat = np.frombuffer(b"".join(packed), dtype="<f4") if len(packed) else np.empty(0, "<f4")
    total = int(counts.sum())
    if total == 0 or flat.size % total:
        raise ValueError(f"packed vectors ({flat.size} floats) do not split into {total} vectors of one width")
    dim = flat.size // total
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(NUMPY_FORMATS[fmt], copy=False)), dim)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, vectors), pa.array(counts.astype(np.int32))


def errors_table(ids: np.ndarray, sources: np.ndarray, messages: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "source": pa.array(sources, pa.string()),
            "error": pa.array(messages, pa.string()),
        },
        schema=ERRORS_SCHEMA,
    )


class OutputStore:
    """Reads and writes one job's output folder (see the module docstring for the layout)."""

    def __init__(self, output: str) -> None:
        self.root: Location = locate(output)
        self.fs = self.root.filesystem

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root.path, *parts)

    # ---- job lifecycle ----
    def open(self, job: dict[str, Any], overwrite: bool) -> set[int]:
        """Prepare the folder for ``job`` and return the indexes of shards already complete.

        A folder holding a different job (any differing key of ``job``) is refused unless ``overwrite``, which
        deletes this layout's files (nothing else in the folder).
        """
        if overwrite:
            self._delete_outputs()
        previous = self.read_manifest()
        if previous is None and self._has_outputs():
            raise OutputExistsError(
                f"{self.root.uri} holds shards but no {MANIFEST_NAME}; pass --overwrite to start over or pick another "
                "output folder"
            )
        if previous is not None and previous.get("job") != job:
            differs = sorted(k for k in set(job) | set(previous.get("job", {})) if previous["job"].get(k) != job.get(k))
            raise OutputExistsError(
                f"{self.root.uri} holds the output of a different job (differs in: {', '.join(differs)}); pass "
                "--overwrite to start over or pick another output folder"
            )
        for folder in (EMBEDDINGS_DIR, ERRORS_DIR):
            self.fs.create_dir(self._path(folder), recursive=True)
        self._delete_temporaries()
        return self.completed_shards()

    def completed_shards(self) -> set[int]:
        """Indexes of shards whose embeddings file exists (and so is complete)."""
        names = [posixpath.basename(path) for path in self.part_paths(EMBEDDINGS_DIR)]
        return {int(name[len("part-") : -len(".parquet")]) for name in names}

    def write_shard(self, shard: Shard, embeddings: pa.Table, errors: pa.Table, writer_node: str = "") -> None:
        """Write one shard: errors first (if any), then the embeddings file that marks it complete."""
        metadata = {WRITER_NODE_KEY: writer_node.encode()} if writer_node else None
        if errors.num_rows:
            self._write_parquet(_with_metadata(errors, metadata), ERRORS_DIR, f"{shard.name}.parquet")
        self._write_parquet(_with_metadata(embeddings, metadata), EMBEDDINGS_DIR, f"{shard.name}.parquet")

    def is_complete(self, shard: Shard) -> bool:
        return self.fs.get_file_info(self._path(EMBEDDINGS_DIR, f"{shard.name}.parquet")).type == pafs.FileType.File

    # ---- fragments: a shard's rows as the workers produced them ----
    def write_fragment(self, shard: Shard, rows: pa.Table) -> None:
        """Write some rows of ``shard`` (columns ``position``, ``id``, ``source``, ``embedding``, ``error``); the
        name depends only on the rows' positions, so writing the same rows twice leaves one file."""
        positions = rows.column("position").to_numpy()
        digest = hashlib.blake2b(np.ascontiguousarray(positions, np.int64).tobytes(), digest_size=6).hexdigest()
        name = f"{int(positions.min()):012d}-{len(positions)}-{digest}.parquet"
        folder = posixpath.join(FRAGMENTS_DIR, shard.name)
        self.fs.create_dir(self._path(folder), recursive=True)
        self._write_parquet(rows, folder, name)

    def complete_from_fragments(self, shard: Shard, writer_node: str = "") -> tuple[int, int] | None:
        """Merge ``shard``'s fragments into its files if they hold every position of the shard.

        Returns ``(rows, errors)`` of the shard when this call wrote it, None when the shard is not complete yet
        (or another worker finished it first).
        """
        folder = posixpath.join(FRAGMENTS_DIR, shard.name)
        names = [name for name in self._list(folder) if _is_part_name(name)]
        if sum(int(name.split("-")[1]) for name in names) < len(shard) or self.is_complete(shard):
            return None
        try:
            table = pa.concat_tables([pq.read_table(self._path(folder, name), filesystem=self.fs) for name in names])
        except FileNotFoundError:  # another worker merged the shard and removed its fragments meanwhile
            return None
        positions = table.column("position").to_numpy()
        order = np.argsort(positions, kind="stable")
        first = np.ones(len(order), dtype=bool)
        first[1:] = positions[order][1:] != positions[order][:-1]  # each position once: retries may repeat rows
        table = table.take(pa.array(order[first]))
        if not np.array_equal(table.column("position").to_numpy(), np.arange(shard.start, shard.stop)):
            return None  # duplicates made the counts add up, but some position is still missing
        bad = pc.not_equal(table.column("error"), "")
        embeddings = table.filter(pc.invert(bad)).drop_columns(["position", "error"])
        errors = table.filter(bad).select(["id", "source", "error"]).cast(ERRORS_SCHEMA)
        self.write_shard(shard, embeddings, errors, writer_node)
        self.delete_fragments(shard)
        return table.num_rows, errors.num_rows

    def delete_fragments(self, shard: Shard) -> None:
        folder = self._path(FRAGMENTS_DIR, shard.name)
        try:
            self.fs.delete_dir(folder)
        except FileNotFoundError:
            pass

    def fragment_shards(self) -> set[int]:
        """Indexes of shards that have a fragment folder."""
        return {int(name[len("part-") :]) for name in self._list(FRAGMENTS_DIR) if name.startswith("part-")}

    def part_paths(self, folder: str) -> list[str]:
        """Finished part files in ``folder`` (``EMBEDDINGS_DIR`` or ``ERRORS_DIR``), in shard order."""
        return sorted(self._path(folder, name) for name in self._list(folder) if _is_part(name))

    def count_rows(self, folder: str) -> int:
        """Rows over every finished part file in ``folder`` (read from Parquet footers, not data)."""
        return sum(pq.read_metadata(path, filesystem=self.fs).num_rows for path in self.part_paths(folder))

    def embedding_dim(self) -> int | None:
        """The vector size stored in the embeddings files (None before any shard is written)."""
        paths = self.part_paths(EMBEDDINGS_DIR)
        if not paths:
            return None
        kind = pq.read_schema(paths[0], filesystem=self.fs).field("embedding").type
        return kind.list_size if pa.types.is_fixed_size_list(kind) else kind.value_type.list_size  # multi-vector

    # ---- manifest ----
    def read_manifest(self) -> dict[str, Any] | None:
        path = self._path(MANIFEST_NAME)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self._atomic_write(MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=False).encode())

    # ---- internals ----
    def _write_parquet(self, table: pa.Table, folder: str, name: str) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self._atomic_write(posixpath.join(folder, name), sink.getvalue().to_pybytes())

    def _atomic_write(self, relative: str, data: bytes) -> None:
        final = self._path(relative)
        temp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.tmp-{uuid.uuid4().hex}")
        with self.fs.open_output_stream(temp) as stream:
            stream.write(data)
        self.fs.move(temp, final)

    def _list(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True)
        return [posixpath.basename(info.path) for info in self.fs.get_file_info(selector)]

    def _has_outputs(self) -> bool:
        return any(_is_part(name) for folder in (EMBEDDINGS_DIR, ERRORS_DIR) for name in self._list(folder))

    def _delete_outputs(self) -> None:
        for folder in (EMBEDDINGS_DIR, ERRORS_DIR, FRAGMENTS_DIR):
            if self.fs.get_file_info(self._path(folder)).type == pafs.FileType.Directory:
                self.fs.delete_dir(self._path(folder))
        if self.fs.get_file_info(self._path(MANIFEST_NAME)).type == pafs.FileType.File:
            self.fs.delete_file(self._path(MANIFEST_NAME))

    def _delete_temporaries(self) -> None:
        for folder in ("", EMBEDDINGS_DIR, ERRORS_DIR):
            for name in self._list(folder):
                if name.startswith(".") and ".tmp-" in name:
                    self.fs.delete_file(self._path(folder, name))


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def _is_part_name(name: str) -> bool:
    """A finished fragment file (not a temporary)."""
    return not name.startswith(".") and name.endswith(".parquet")


def _with_metadata(table: pa.Table, metadata: dict[bytes, bytes] | None) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}) if metadata else table


class FragmentWriter:
    """Runs on the model actors: writes the rows of one embedded batch into their shards' fragments and finishes
    every shard that the batch completes. Returns one small row per (batch, shard) for the driver's progress.

    ``encode`` turns a batch's columns into the stored rows (``id``, ``source``, ``embedding``); it is
    :func:`embeddings_table`, the one place that knows how a row's embedding is stored.
    """

    def __init__(self, store: OutputStore, shard_size: int, num_items: int, fmt: str) -> None:
        self.store = store
        self.shard_size = shard_size
        self.num_items = num_items
        self.fmt = fmt
        self.node_id: str | None = None  # the node of the process that writes, found there (not the driver's)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.node_id is None:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        shards = np.asarray(batch["position"]) // self.shard_size
        report: dict[str, list] = {key: [] for key in ("shard", "rows", "errors", "done_rows", "done_errors", "node")}
        for index in np.unique(shards):
            shard = Shard(
                int(index), int(index) * self.shard_size, min((int(index) + 1) * self.shard_size, self.num_items)
            )
            rows = np.flatnonzero(shards == index)
            part = {key: column[rows] for key, column in batch.items()}
            done = None
            if not self.store.is_complete(shard):  # a retried task's rows of a finished shard are dropped
                self.store.write_fragment(shard, fragment_table(part, self.fmt))
                done = self.store.complete_from_fragments(shard, self.node_id)
            report["shard"].append(shard.index)
            report["rows"].append(len(rows))
            report["errors"].append(int((part["error"] != "").sum()))
            report["done_rows"].append(done[0] if done else -1)
            report["done_errors"].append(done[1] if done else -1)
            report["node"].append(self.node_id)
        return {key: np.array(values, dtype=object if key == "node" else np.int64) for key, values in report.items()}


def fragment_table(columns: dict[str, np.ndarray], fmt: str) -> pa.Table:
    """A batch's rows as stored in a fragment: :func:`embeddings_table` plus ``position`` and ``error``."""
    table = embeddings_table(columns["id"], columns["source"], columns["embedding"], fmt, columns.get("num_vectors"))
    position = pa.array(np.asarray(columns["position"], dtype=np.int64))
    error = pa.array(columns["error"], pa.string())
    return table.append_column("position", position).append_column("error", error)


def writer_nodes(output: str) -> dict[str, str]:
    """``{shard file name: Ray node id of the worker that wrote it}`` over the finished shards."""
    store = OutputStore(output)
    nodes = {}
    for path in store.part_paths(EMBEDDINGS_DIR):
        metadata = pq.read_schema(path, filesystem=store.fs).metadata or {}
        nodes[posixpath.basename(path)] = metadata.get(WRITER_NODE_KEY, b"").decode()
    return nodes


def read_manifest(output: str) -> dict[str, Any]:
    """The ``_manifest.json`` of a batch-embedding output folder (for Serve, evaluation and users)."""
    manifest = OutputStore(output).read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{output} has no {MANIFEST_NAME}; is it the output folder of `vembed embed`?")
    return manifest


def read_embeddings(output: str) -> pa.Table:
    """Every finished shard's ``id``, ``source`` and ``embedding`` rows, in shard order."""
    return _read_parts(output, EMBEDDINGS_DIR, schema=None)


def read_errors(output: str) -> pa.Table:
    """Every recorded bad input (``id``, ``source``, ``error``); empty when there were none."""
    return _read_parts(output, ERRORS_DIR, schema=ERRORS_SCHEMA)


def _read_parts(output: str, folder: str, schema: pa.Schema | None) -> pa.Table:
    store = OutputStore(output)
    tables = [pq.read_table(path, filesystem=store.fs) for path in store.part_paths(folder)]
    if not tables:
        if schema is None:
            raise FileNotFoundError(f"{output} has no finished {folder} shards")
        return schema.empty_table()
    return pa.concat_tables(tables)
