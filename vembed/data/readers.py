"""Read raw records from JSONL, CSV and Parquet files: one file or a directory of them, local or any pyarrow URI.

Every record comes back as a plain dict with :data:`~vembed.data.records.SOURCE_FIELD` set to where it came from
(``"/data/train.jsonl:line 12"``, ``"/data/part-0.parquet:row 7"``), so any later error can point at the exact line.
A line that is not valid JSON raises :class:`RecordFileError` naming the file and line. CSV cells are strings; list
columns (``negatives``) hold JSON lists and are decoded by the schema. Parsing works on an open file object, so the
torch Dataset (:func:`read_records`) and the Ray Data datasource (:mod:`vembed.data.pipeline`) share it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from typing import IO, Any

import pyarrow.fs as pafs

from vembed.data.records import SOURCE_FIELD, RecordSchema, normalize_records

RECORD_EXTENSIONS: dict[str, str] = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 1024


class RecordFileError(ValueError):
    """A record file cannot be parsed; the message names the file and the line."""


class EmptyDatasetError(ValueError):
    """A data path holds no records."""


def record_format(path: str) -> str:
    """``"jsonl"``, ``"csv"`` or ``"parquet"`` from the file extension; anything else is an error."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in RECORD_EXTENSIONS:
        raise RecordFileError(
            f"{path}: unsupported record file type {ext or '(no extension)'!r}; "
            f"use one of {', '.join(sorted(RECORD_EXTENSIONS))}"
        )
    return RECORD_EXTENSIONS[ext]


def resolve_record_files(path: str | os.PathLike) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and sorted record files at ``path`` (a file, or a directory searched recursively).

    ``path`` is a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` understands (``s3://``, ``gs://``,
    ``hdfs://``, ``file://``). Names starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc``) are skipped, as Ray does.
    """
    text = os.fspath(path)
    if "://" not in text:
        text = os.path.abspath(os.path.expanduser(text))
    try:
        fs, root = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as exc:
        raise FileNotFoundError(f"cannot open data path {text!r}: {exc}") from exc
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data path not found: {text}")
    if info.type == pafs.FileType.File:
        record_format(root)
        return fs, [root]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and os.path.splitext(i.path)[1].lower() in RECORD_EXTENSIONS
        and not any(part.startswith((".", "_")) for part in os.path.relpath(i.path, root).split("/"))
    )
    if not files:
        raise EmptyDatasetError(
            f"no record files under {text}: expected files ending in {', '.join(sorted(RECORD_EXTENSIONS))}"
        )
    return fs, files


def parse_record_file(f: IO[bytes], path: str, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """Raw records of one open record file, each with :data:`SOURCE_FIELD` set; streams, never loads it whole."""
    fmt = fmt or record_format(path)
    if fmt == "jsonl":
        yield from _parse_jsonl(f, path)
    elif fmt == "csv":
        yield from _parse_csv(f, path)
    elif fmt == "parquet":
        yield from _parse_parquet(f, path)
    else:
        raise RecordFileError(f"{path}: unknown record format {fmt!r}; expected jsonl, csv or parquet")


def iter_raw_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw records of every record file at ``path``, in file order."""
    fs, files = resolve_record_files(path)
    for file in files:
        with fs.open_input_file(file) as f:
            yield from parse_record_file(f, file)


def read_records(path: str | os.PathLike, schema: RecordSchema) -> tuple[list[dict[str, Any]], RecordSchema]:
    """All records at ``path``, normalised by ``schema``; returns them with the schema's layout fixed.

    Raises :class:`EmptyDatasetError` when there are none.
    """
    normalized = list(normalize_records(iter_raw_records(path), schema))
    if not normalized:
        raise EmptyDatasetError(f"no records in {os.fspath(path)}: the data set is empty")
    return [rec for rec, _ in normalized], normalized[-1][1]


def first_record(path: str | os.PathLike, schema: RecordSchema) -> dict[str, Any]:
    """The first record at ``path``, normalised; reads only as far as it. Raises EmptyDatasetError if none."""
    for rec, _ in normalize_records(iter_raw_records(path), schema):
        return rec
    raise EmptyDatasetError(f"no records in {os.fspath(path)}: the data set is empty")


def _binary_lines(f: IO[bytes], chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """The lines of a binary file (``\n`` kept), read in chunks: each line is decoded on its own, so a decoding
    error is reported at its own line, not at the first line of the chunk a text wrapper was decoding."""
    pending = b""
    while chunk := f.read(chunk_size):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


def _text_lines(f: IO[bytes], path: str) -> Iterator[str]:
    """The lines of a UTF-8 file, decoded one by one; a byte that is not UTF-8 is reported at its own line."""
    for lineno, raw in enumerate(_binary_lines(f), start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordFileError(
                f"{path}:line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line); "
                "re-encode the file as UTF-8"
            ) from exc


def _parse_jsonl(f: IO[bytes], path: str) -> Iterator[dict[str, Any]]:
    for lineno, line in enumerate(_text_lines(f, path), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = (
                " (a .json file must hold one JSON object per line, not an array)" if line.lstrip()[:1] == "[" else ""
            )
            raise RecordFileError(
                f"{path}:line {lineno}: malformed JSON: {exc.msg} at column {exc.colno}{hint}"
            ) from exc
        if not isinstance(rec, dict):
            raise RecordFileError(f"{path}:line {lineno}: expected a JSON object, got {type(rec).__name__}")
        rec[SOURCE_FIELD] = f"{path}:line {lineno}"
        yield rec


def _parse_csv(f: IO[bytes], path: str) -> Iterator[dict[str, Any]]:
    reader = csv.DictReader(_text_lines(f, path))
    try:
        for row in reader:
            if None in row:
                raise RecordFileError(f"{path}:line {reader.line_num}: more fields than the header has columns")
            row[SOURCE_FIELD] = f"{path}:line {reader.line_num}"
            yield row
    except csv.Error as exc:
        raise RecordFileError(f"{path}:line {reader.line_num}: malformed CSV: {exc}") from exc


def _parse_parquet(f: IO[bytes], path: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants for non-Parquet bytes
        raise RecordFileError(f"{path}: not a readable Parquet file: {exc}") from exc
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for rec in batch.to_pylist():
            row += 1
            rec[SOURCE_FIELD] = f"{path}:row {row}"
            yield rec
