"""What to embed: an image folder or a manifest file, local or behind any pyarrow filesystem URI.

A corpus is two string columns, ``id`` and ``source`` (an image path/URI, or the text itself in text mode), in a
stable order: sorted relative paths for a folder, row order for a manifest. That order is what makes shards
deterministic (:mod:`vembed.batch.shards`), so a rerun sees the same items in the same shards.

Two readers share the column rules below. :func:`list_corpus` (what the job uses) never gathers the corpus in one
process: a manifest is read in parallel by Ray Data, a folder by one Ray task per top-level subdirectory, and the
listing stays in the object store as ordered Arrow blocks (:class:`Listing`), the driver keeping only each block's
row count. Duplicate ids are found by a hash-partitioned check (:func:`find_repeated_ids`: every block splits its
ids into ``P`` partitions by a hash of the id, one task per partition looks for repeats, so no process holds more
than ``1/P`` of the ids). :func:`load_corpus` reads the same way in this process, for small corpora and tests.

Images are read later, by Ray Data workers.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from vembed.batch.options import MODALITIES
from vembed.data.images import IMAGE_EXTENSIONS, resolve_location
from vembed.data.readers import EmptyDatasetError, RecordFileError, iter_raw_records, record_format
from vembed.data.records import SOURCE_FIELD

Modality = Literal["image", "text"]
# Column names tried, in order, when the caller does not name the source column.
SOURCE_COLUMNS: dict[str, tuple[str, ...]] = {"image": ("path", "image", "image_path", "file"), "text": ("text",)}
ID_COLUMN = "id"
#: most ids one duplicate-check task holds (the number of hash partitions follows from it)
IDS_PER_PARTITION = 2_000_000


class CorpusError(ValueError):
    """The input cannot be read as a corpus; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Corpus:
    """Items to embed, in a stable order: ``table`` has string columns ``id`` (unique) and ``source``."""

    table: pa.Table
    modality: Modality
    origin: str

    def __len__(self) -> int:
        return self.table.num_rows


@dataclass(frozen=True)
class Location:
    """A path on a pyarrow filesystem, plus the spelling users see (``s3://bucket/x.jpg`` or ``/abs/x.jpg``)."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    def child(self, relative: str) -> Location:
        return Location(self.filesystem, posixpath.join(self.path, relative), posixpath.join(self.uri, relative))


def locate(path_or_uri: str) -> Location:
    """``s3://...``, ``gs://...``, ``hdfs://...``, ``file://...`` or a local path -> :class:`Location`."""
    text = str(path_or_uri)
    if "://" in text:
        filesystem, path = pafs.FileSystem.from_uri(text)
        scheme = text.split("://", 1)[0]
        uri = path if scheme == "file" else f"{scheme}://{path}"
        return Location(filesystem, path, uri)
    local = posixpath.abspath(posixpath.expanduser(text))
    return Location(pafs.LocalFileSystem(), local, local)


def _check_input(source: str, modality: str, id_column: str | None, source_column: str | None) -> tuple[Any, bool]:
    """``(location, is_folder)`` of a corpus input, after the checks both listings share: a known modality, an input
    that exists, and a folder only for images named by their relative paths."""
    if modality not in MODALITIES:
        raise CorpusError(f"modality={modality!r} is not supported; use one of {MODALITIES}")
    location = locate(source)
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"input {source!r} does not exist; pass an image folder or a JSONL/CSV/Parquet manifest")
    is_folder = info.type == pafs.FileType.Directory
    if is_folder and (modality != "image" or id_column or source_column):
        raise CorpusError(
            f"input {source!r} is a folder, which is read as images with their relative paths as ids; "
            "for texts or custom columns pass a JSONL/CSV/Parquet manifest"
        )
    return location, is_folder


def load_corpus(
    source: str,
    modality: Modality = "image",
    id_column: str | None = None,
    source_column: str | None = None,
    image_root: str | None = None,
) -> Corpus:
    """Read the ids and sources of a folder (images, recursive, by extension) or a JSONL/CSV/Parquet manifest.

    Args:
        source: folder or manifest, local path or pyarrow-filesystem URI.
        modality: ``"image"`` or ``"text"`` (text needs a manifest with a text column).
        id_column: manifest column holding unique ids (default ``id``).
        source_column: manifest column holding image paths or texts (default: the first of
            ``path``/``image``/``image_path``/``file`` for images, ``text`` for texts).
        image_root: folder that relative image paths are resolved against (default: the manifest's folder).
    """
    location, is_folder = _check_input(source, modality, id_column, source_column)
    if is_folder:
        table = _list_images(location)
    else:
        try:
            record_format(location.path)
        except RecordFileError as exc:
            raise CorpusError(f"{exc}; or pass an image folder") from exc
        table = _read_manifest(location, modality, id_column, source_column, image_root)
    _check_unique_ids(table, source)
    return Corpus(table=table, modality=modality, origin=location.uri)


def _list_images(folder: Location) -> pa.Table:
    table = list_images(folder, "")
    if not table.num_rows:
        raise CorpusError(f"folder {folder.uri!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return table


def list_images(folder: Location, subdir: str) -> pa.Table:
    """``id`` (path relative to ``folder``) and ``source`` of every image under ``folder/subdir``, recursively,
    sorted by id. ``subdir=""`` lists the whole folder."""
    selector = pafs.FileSelector(posixpath.join(folder.path, subdir) if subdir else folder.path, recursive=True)
    relative = sorted(
        posixpath.relpath(info.path, folder.path)
        for info in folder.filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File and info.path.lower().endswith(IMAGE_EXTENSIONS)
    )
    return pa.table({"id": relative, "source": [folder.child(r).uri for r in relative]}, schema=_schema())


def _read_manifest(
    manifest: Location, modality: Modality, id_column: str | None, source_column: str | None, image_root: str | None
) -> pa.Table:
    """Stream the manifest's records (the shared record readers), keeping only the id and source of each."""
    id_name = id_column or ID_COLUMN
    candidates = [source_column] if source_column else list(SOURCE_COLUMNS[modality])
    root = locate(image_root).uri if image_root else posixpath.dirname(manifest.uri)
    ids: list[str] = []
    sources: list[str | None] = []
    source_name: str | None = None
    try:
        for record in iter_raw_records(manifest.uri):
            where = record[SOURCE_FIELD]
            if source_name is None:
                _require_column(record, [id_name], where, "id", "--id-column")
                source_name = _require_column(record, candidates, where, f"{modality} source", "--source-column")
            if record.get(id_name) in (None, ""):
                raise CorpusError(f"{where}: the id column {id_name!r} is empty; every record needs an id")
            value = record.get(source_name)
            value = None if value in (None, "") else str(value)
            ids.append(str(record[id_name]))
            sources.append(resolve_location(value, root) if modality == "image" and value else value)
    except (RecordFileError, EmptyDatasetError) as exc:
        raise CorpusError(str(exc)) from exc
    if not ids:
        raise CorpusError(f"manifest {manifest.uri!r} holds no records")
    return pa.table({"id": ids, "source": sources}, schema=_schema())


def _require_column(record: dict, candidates: list[str], where: str, role: str, option: str) -> str:
    for name in candidates:
        if name in record:
            return name
    columns = sorted(k for k in record if k != SOURCE_FIELD)
    raise CorpusError(
        f"{where}: no {role} column (looked for {candidates}; the record has {columns}); name the column with {option}"
    )


def _check_unique_ids(table: pa.Table, source: str) -> None:
    _raise_if_repeated(repeated_ids(table.column("id")), source)


def repeated_ids(ids: pa.ChunkedArray | pa.Array, limit: int = 5) -> list[str]:
    """Up to ``limit`` ids that occur more than once in ``ids`` (sorted)."""
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    return sorted(repeated.to_pylist())[:limit]


def _raise_if_repeated(repeated: list[str], source: str) -> None:
    if repeated:
        raise CorpusError(f"input {source!r} repeats ids {repeated}; every id must be unique so each is written once")


def _schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("source", pa.string())])


# ------------------------------------------------------------------------------ the distributed listing (the job's)


@dataclass(frozen=True)
class Listing:
    """A corpus as Arrow blocks (``id``, ``source``) in the Ray object store, in corpus order.

    ``counts[i]`` rows are in ``blocks[i]``; block ``i`` holds corpus positions ``offsets[i] .. offsets[i] +
    counts[i]``. The driver holds only the references and counts (a few bytes per block, not per item).
    """

    blocks: list[Any]  # ray.ObjectRef[pa.Table]
    counts: list[int]
    modality: Modality
    origin: str

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def offsets(self) -> list[int]:
        starts = [0]
        for count in self.counts[:-1]:
            starts.append(starts[-1] + count)
        return starts


def list_corpus(
    source: str,
    modality: Modality = "image",
    id_column: str | None = None,
    source_column: str | None = None,
    image_root: str | None = None,
) -> Listing:
    """:func:`load_corpus`'s corpus, listed by Ray workers: a manifest read by Ray Data, a folder by one task per
    top-level subdirectory. Repeated ids are refused (checked by :func:`find_repeated_ids`). Needs Ray running."""
    location, is_folder = _check_input(source, modality, id_column, source_column)
    if is_folder:
        listing = _list_folder_in_tasks(location)
    else:
        try:
            fmt = record_format(location.path)
        except RecordFileError as exc:
            raise CorpusError(f"{exc}; or pass an image folder") from exc
        listing = _read_manifest_with_ray_data(location, fmt, modality, id_column, source_column, image_root)
    _raise_if_repeated(find_repeated_ids(listing.blocks, len(listing)), source)
    return listing


def _list_folder_in_tasks(folder: Location) -> Listing:
    """Images directly in ``folder`` listed here; each subdirectory (recursively) by a Ray task of its own.

    Entries are ordered as their paths sort (a directory ``a`` as ``a/``), so concatenating the per-entry listings
    gives the same sorted order as one recursive listing.
    """
    import ray

    entries = folder.filesystem.get_file_info(pafs.FileSelector(folder.path, recursive=False))
    keyed = []
    for entry in entries:
        name = posixpath.basename(entry.path)
        if entry.type == pafs.FileType.Directory:
            keyed.append((name + "/", name))
        elif entry.type == pafs.FileType.File and name.lower().endswith(IMAGE_EXTENSIONS):
            keyed.append((name, None))
    keyed.sort()
    lister = ray.remote(num_returns=2)(_list_subdir).options(num_cpus=0.5)
    blocks: list[Any] = []
    count_refs: list[Any] = []
    files: list[str] = []

    def flush_files() -> None:
        if files:
            table = pa.table({"id": files, "source": [folder.child(f).uri for f in files]}, schema=_schema())
            blocks.append(ray.put(table))
            count_refs.append(len(files))
            files.clear()

    for key, subdir in keyed:
        if subdir is None:
            files.append(key)
            continue
        flush_files()
        table_ref, count_ref = lister.remote(folder, subdir)
        blocks.append(table_ref)
        count_refs.append(count_ref)
    flush_files()
    counts = [c if isinstance(c, int) else ray.get(c) for c in count_refs]
    kept = [(block, count) for block, count in zip(blocks, counts, strict=True) if count]
    if not kept:
        raise CorpusError(f"folder {folder.uri!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return Listing([b for b, _ in kept], [c for _, c in kept], "image", folder.uri)


def _list_subdir(folder: Location, subdir: str) -> tuple[pa.Table, int]:
    table = list_images(folder, subdir)
    return table, table.num_rows


def _read_manifest_with_ray_data(
    manifest: Location,
    fmt: str,
    modality: Modality,
    id_column: str | None,
    source_column: str | None,
    image_root: str | None,
) -> Listing:
    """Read the manifest with Ray Data's readers, keep ``id`` and ``source`` (normalised by :func:`id_source_block`)
    and materialise the blocks in file order in the object store."""
    import ray

    id_name = id_column or ID_COLUMN
    candidates = [source_column] if source_column else list(SOURCE_COLUMNS[modality])
    root = locate(image_root).uri if image_root else posixpath.dirname(manifest.uri)
    options: dict[str, Any] = {"filesystem": manifest.filesystem}
    try:
        if fmt == "jsonl":
            dataset = ray.data.read_json(manifest.path, file_extensions=None, **options)  # JSONL: a row a line
        elif fmt == "csv":
            import pyarrow.csv as pacsv

            # Ids and sources stay the text they are in the file ("007" is not the number 7).
            strings = {name: pa.string() for name in [id_name, *candidates]}
            convert = pacsv.ConvertOptions(column_types=strings)
            dataset = ray.data.read_csv(manifest.path, convert_options=convert, **options)
        else:
            dataset = ray.data.read_parquet(manifest.path, **options)
    except Exception as exc:  # noqa: BLE001 -- Ray wraps the reader's error; say which file could not be read
        raise CorpusError(f"manifest {manifest.uri!r} cannot be read as {fmt}: {_cause(exc)}") from exc
    where = manifest.uri
    dataset = dataset.map_batches(
        id_source_block,
        fn_kwargs={"id_names": [id_name], "source_names": candidates, "modality": modality, "root": root},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.5,
    )
    dataset.context.execution_options.preserve_order = True  # block order is file order: positions follow from it
    try:
        materialized = dataset.materialize()
    except Exception as exc:  # noqa: BLE001
        cause = _cause(exc)
        if isinstance(cause, CorpusError):
            raise CorpusError(f"{where}: {cause}") from exc
        raise CorpusError(f"manifest {manifest.uri!r} cannot be read as {fmt}: {cause}") from exc
    blocks, counts = [], []
    for bundle in materialized.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            if entry.metadata.num_rows:
                blocks.append(entry.ref)
                counts.append(entry.metadata.num_rows)
    if not blocks:
        raise CorpusError(f"manifest {manifest.uri!r} holds no records")
    return Listing(blocks, counts, modality, manifest.uri)


def id_source_block(
    table: pa.Table, id_names: list[str], source_names: list[str], modality: str, root: str
) -> pa.Table:
    """One block of manifest records -> ``id`` and ``source`` strings (the first of ``id_names`` /
    ``source_names`` present), relative image paths resolved onto ``root``; a missing column or an empty id is an
    error that names the option to fix it."""
    record = dict.fromkeys(table.column_names)
    id_name = _require_column(record, id_names, "manifest", "id", "--id-column")
    source_name = _require_column(record, source_names, "manifest", f"{modality} source", "--source-column")
    ids = pc.cast(table.column(id_name), pa.string())
    if ids.null_count or pc.any(pc.equal(ids, "")).as_py():
        raise CorpusError(f"the id column {id_name!r} is empty in some record; every record needs an id")
    sources = [None if v in (None, "") else str(v) for v in table.column(source_name).to_pylist()]
    if modality == "image":
        sources = [resolve_location(v, root) if v else v for v in sources]
    return pa.table({"id": ids, "source": pa.array(sources, pa.string())})


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError, UserCodeException): the first
    :class:`CorpusError` along the chain of causes, else the innermost cause. Ray Data sometimes keeps only the
    traceback text of a task's error; a ``CorpusError: ...`` line there is recovered as one."""
    chain, seen = [exc], set()
    while chain:
        current = chain.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CorpusError):
            return CorpusError(str(current).splitlines()[-1] if "\n" in str(current) else str(current))
        chain += [e for e in (getattr(current, "cause", None), current.__cause__, current.__context__) if e]
    for text in (str(exc), *(str(getattr(e, "cause", "")) for e in [exc])):
        for line in reversed(text.splitlines()):
            if "CorpusError: " in line:
                return CorpusError(line.split("CorpusError: ", 1)[1])
    innermost = exc
    while (nxt := getattr(innermost, "cause", None) or innermost.__cause__) is not None and nxt is not innermost:
        innermost = nxt
    return innermost


def find_repeated_ids(blocks: list[Any], num_items: int, limit: int = 5) -> list[str]:
    """Ids that occur more than once over ``blocks`` (refs of tables with an ``id`` column), hash-partitioned.

    Each block splits its ids into ``P = ceil(num_items / IDS_PER_PARTITION)`` partitions by a hash of the id (a
    Ray task per block); one task per partition looks for repeats among its ids (:func:`repeated_ids`). An id's
    copies all land in the same partition, so no process ever holds more than one partition of the ids.
    """
    import ray

    partitions = max(1, math.ceil(num_items / IDS_PER_PARTITION))
    split = ray.remote(num_returns=partitions)(_partition_ids).options(num_cpus=0.5)
    check = ray.remote(_repeated_in_parts).options(num_cpus=0.5)
    parts = [split.remote(block, partitions) for block in blocks]
    parts = [[p] if partitions == 1 else p for p in parts]
    found = ray.get([check.remote(limit, *[block_parts[k] for block_parts in parts]) for k in range(partitions)])
    return sorted(item for items in found for item in items)[:limit]


def _partition_ids(table: pa.Table, partitions: int) -> pa.Array | list[pa.Array]:
    ids = table.column("id").combine_chunks()
    if partitions == 1:
        return ids
    keys = np.array([stable_hash(item) % partitions for item in ids.to_pylist()], dtype=np.int64)
    return [ids.filter(pa.array(keys == k)) for k in range(partitions)]


def _repeated_in_parts(limit: int, *parts: pa.Array) -> list[str]:
    return repeated_ids(pa.chunked_array(parts, pa.string()), limit)


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and run (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
