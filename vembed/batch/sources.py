"""What to embed: an image folder or a manifest file, local or behind any pyarrow filesystem URI.

A corpus is a two-column Arrow table, ``id`` and ``source`` (an image path/URI, or the text itself in text mode), in a
stable order: sorted relative paths for a folder, row order for a manifest. That order is what makes shards
deterministic (:mod:`vembed.batch.shards`), so a rerun sees the same items in the same shards.

Only ids and sources are held (a few dozen bytes per item); images are read later, by Ray Data workers.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs

from vembed.batch.options import MODALITIES
from vembed.data.images import IMAGE_EXTENSIONS, resolve_location
from vembed.data.readers import EmptyDatasetError, RecordFileError, iter_raw_records, record_format
from vembed.data.records import SOURCE_FIELD

Modality = Literal["image", "text"]
# Column names tried, in order, when the caller does not name the source column.
SOURCE_COLUMNS: dict[str, tuple[str, ...]] = {"image": ("path", "image", "image_path", "file"), "text": ("text",)}
ID_COLUMN = "id"


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
    if modality not in MODALITIES:
        raise CorpusError(f"modality={modality!r} is not supported; use one of {MODALITIES}")
    location = locate(source)
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"input {source!r} does not exist; pass an image folder or a JSONL/CSV/Parquet manifest")
    if info.type == pafs.FileType.Directory:
        if modality != "image" or id_column or source_column:
            raise CorpusError(
                f"input {source!r} is a folder, which is read as images with their relative paths as ids; "
                "for texts or custom columns pass a JSONL/CSV/Parquet manifest"
            )
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
    selector = pafs.FileSelector(folder.path, recursive=True)
    relative = sorted(
        posixpath.relpath(info.path, folder.path)
        for info in folder.filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File and info.path.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not relative:
        raise CorpusError(f"folder {folder.uri!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
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
    seen: set[str] = set()
    repeated: list[str] = []
    for item in table.column("id").to_pylist():
        if item in seen and len(repeated) < 5:
            repeated.append(item)
        seen.add(item)
    if repeated:
        raise CorpusError(f"input {source!r} repeats ids {repeated}; every id must be unique so each is written once")


def _schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("source", pa.string())])
