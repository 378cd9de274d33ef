"""Record schema and readers: modes, column mapping, image_root, JSONL/CSV/Parquet, files/dirs/URIs, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vembed.data.readers import (
    EmptyDatasetError,
    RecordFileError,
    first_record,
    iter_raw_records,
    read_records,
    resolve_record_files,
)
from vembed.data.records import (
    RETRIEVAL_MODES,
    SOURCE_FIELD,
    RecordError,
    RecordSchema,
    normalize_records,
    role_modalities,
)

pytestmark = pytest.mark.unit


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def t2i(i: int, **extra) -> dict:
    return {"id": f"r{i}", "query": f"caption {i}", "positive": f"/img/{i}.jpg", **extra}


# -- modes ------------------------------------------------------------------------------------------------------------


def test_role_modalities_of_every_mode():
    expected = {
        "t2i": ({"text"}, {"image"}),
        "i2i": ({"image"}, {"image"}),
        "i2t": ({"image"}, {"text"}),
        "t2t": ({"text"}, {"text"}),
        "m2i": ({"text", "image"}, {"image"}),
        "m2t": ({"text", "image"}, {"text"}),
    }
    assert set(expected) == set(RETRIEVAL_MODES)
    for mode, (query, positive) in expected.items():
        roles = role_modalities(mode)
        assert roles == {"query": query, "positive": positive, "negative": positive}


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="t2i, i2i, i2t, t2t, m2i, m2t"):
        role_modalities("text2image")


def test_modality_follows_the_mode_not_the_string():
    """A caption that looks like a file name stays text in t2t; a path-less name is an image in i2i."""
    rec = {"query": "photo.jpg", "positive": "cat", "negatives": ["dog.png"]}
    as_text = RecordSchema("t2t", image_root="/root").normalize(rec, "f:line 1")
    assert (as_text["query"], as_text["query_image"], as_text["negatives"]) == ("photo.jpg", None, ["dog.png"])
    as_image = RecordSchema("i2i", image_root="/root").normalize(rec, "f:line 1")
    assert as_image["query"] is None
    assert as_image["query_image"] == "/root/photo.jpg"
    assert as_image["positive"] == "/root/cat"
    assert as_image["negatives"] == ["/root/dog.png"]


def test_multimodal_query_needs_text_and_image():
    schema = RecordSchema("m2t")
    rec = schema.normalize({"query": "make it blue", "query_image": "/a.jpg", "positive": "a blue cat"}, "f:line 1")
    assert (rec["query"], rec["query_image"], rec["positive"]) == ("make it blue", "/a.jpg", "a blue cat")
    with pytest.raises(RecordError, match=r"f:line 2: missing field 'query_image'"):
        schema.normalize({"query": "make it blue", "positive": "a blue cat"}, "f:line 2")


def test_image_query_may_be_given_as_query_image():
    rec = RecordSchema("i2t").normalize({"query_image": "/q.jpg", "positive": "a cat"}, "f:line 1")
    assert rec["query_image"] == "/q.jpg" and rec["query"] is None


# -- validation --------------------------------------------------------------------------------------------------------


def test_missing_field_names_source_field_and_fix():
    with pytest.raises(RecordError) as err:
        RecordSchema("t2i").normalize({"caption": "a cat", "positive": "/a.jpg"}, "data.jsonl:line 7")
    msg = str(err.value)
    assert "data.jsonl:line 7" in msg and "'query'" in msg and "caption" in msg and "column_mapping" in msg


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("negatives", "/n.jpg", "'negatives' must be a list"),
        ("negatives", [1, 2], r"negatives\[0\] must be a string"),
        ("query", 5, "'query' .* must be a string"),
        ("label", "cat", "'label' must be an integer"),
    ],
)
def test_wrong_types_are_named(field, value, match):
    with pytest.raises(RecordError, match=match):
        RecordSchema("t2i").normalize({**t2i(0), field: value}, "x.jsonl:line 1")


def test_every_record_needs_the_same_number_of_negatives():
    records = [
        t2i(0, negatives=["/a.jpg", "/b.jpg"], **{SOURCE_FIELD: "d:line 1"}),
        t2i(1, negatives=["/c.jpg"], **{SOURCE_FIELD: "d:line 2"}),
    ]
    with pytest.raises(RecordError, match="d:line 2: record has 1 negatives but the data set's first record has 2"):
        list(normalize_records(records, RecordSchema("t2i")))


def test_labels_on_all_records_or_none():
    schema = RecordSchema("t2i").with_layout_of(RecordSchema("t2i").normalize(t2i(0, label=3), "d:line 1"))
    with pytest.raises(RecordError, match="d:line 2: record has no 'label'"):
        schema.normalize(t2i(1), "d:line 2")


def test_empty_text_is_left_for_the_bad_record_policy():
    """An empty caption is bad content (skip/fail policy at batching), not a schema error."""
    rec = RecordSchema("t2i").normalize({**t2i(0), "query": ""}, "d:line 1")
    assert rec["query"] == ""


def test_normalising_twice_changes_nothing(tmp_path):
    schema = RecordSchema("t2i", {"caption": "query"}, image_root=str(tmp_path))
    once = schema.normalize({"caption": "a cat", "positive": "cat.jpg", "negatives": ["dog.jpg"]}, "d:line 1")
    assert schema.normalize(once) == once
    assert once["positive"] == str(tmp_path / "cat.jpg")


# -- column mapping and image_root -------------------------------------------------------------------------------------


def test_column_mapping_renames_before_validation():
    schema = RecordSchema("t2i", {"caption": "query", "image": "positive", "hard": "negatives", "cls": "label"})
    rec = schema.normalize({"caption": "a cat", "image": "/c.jpg", "hard": ["/d.jpg"], "cls": 2}, "d:line 1")
    assert (rec["query"], rec["positive"], rec["negatives"], rec["label"]) == ("a cat", "/c.jpg", ["/d.jpg"], 2)


def test_column_mapping_errors():
    with pytest.raises(ValueError, match="'img' to 'picture', which is not a record field"):
        RecordSchema("t2i", {"img": "picture"})
    with pytest.raises(RecordError, match="already has a 'query' column"):
        RecordSchema("t2i", {"caption": "query"}).normalize({**t2i(0), "caption": "x"}, "d:line 1")


def test_image_root_resolves_relative_paths_only(tmp_path, monkeypatch):
    rec = {"query": "q", "positive": "a/b.jpg", "negatives": ["/abs/c.jpg", "s3://bucket/d.jpg"]}
    local = RecordSchema("t2i", image_root="/data").normalize(rec, "d:line 1")
    assert (local["positive"], local["negatives"]) == ("/data/a/b.jpg", ["/abs/c.jpg", "s3://bucket/d.jpg"])
    remote = RecordSchema("t2i", image_root="s3://bucket/imgs/").normalize(rec, "d:line 1")
    assert remote["positive"] == "s3://bucket/imgs/a/b.jpg"
    monkeypatch.chdir(tmp_path)
    relative_root = RecordSchema("t2i", image_root="imgs").normalize(rec, "d:line 1")
    assert relative_root["positive"] == str(tmp_path / "imgs" / "a" / "b.jpg")
    assert RecordSchema("t2i").normalize(rec, "d:line 1")["positive"] == "a/b.jpg"


# -- readers -----------------------------------------------------------------------------------------------------------


def test_jsonl_csv_parquet_read_the_same_records(shapes_t2i):
    results = {}
    for fmt in ("jsonl", "csv", "parquet"):
        records, schema = read_records(shapes_t2i[f"train.{fmt}"], RecordSchema("t2i"))
        results[fmt] = [{k: v for k, v in r.items() if k != SOURCE_FIELD} for r in records]
        assert schema.num_negatives == 0 and schema.has_label is True
    assert len(results["jsonl"]) == 64
    assert results["jsonl"] == results["csv"] == results["parquet"]
    assert all(isinstance(r["label"], int) for r in results["csv"])


def test_csv_list_columns_hold_json(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('query,positive,negatives\na cat,/c.jpg,"[""/d.jpg"", ""/e.jpg""]"\n')
    (rec,), schema = read_records(path, RecordSchema("t2i"))
    assert rec["negatives"] == ["/d.jpg", "/e.jpg"] and schema.num_negatives == 2
    assert rec[SOURCE_FIELD] == f"{path}:line 2"


def test_directory_reads_every_record_file_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [t2i(2), t2i(3)])
    write_jsonl(tmp_path / "a.jsonl", [t2i(0), t2i(1)])
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.Table.from_pylist([t2i(4)]), tmp_path / "sub" / "c.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("not records")
    records, _ = read_records(tmp_path, RecordSchema("t2i"))
    assert [r["id"] for r in records] == ["r0", "r1", "r2", "r3", "r4"]
    assert records[4][SOURCE_FIELD] == f"{tmp_path / 'sub' / 'c.parquet'}:row 1"


def test_uri_paths_use_pyarrow_filesystems(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [t2i(0)])
    _, files = resolve_record_files(f"file://{path}")
    assert files == [str(path)]
    assert [r["query"] for r in iter_raw_records(f"file://{tmp_path}")] == ["caption 0"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(t2i(0)) + "\n\n" + '{"query": "a cat", "positive": \n' + json.dumps(t2i(1)) + "\n")
    with pytest.raises(RecordFileError, match=rf"{path}:line 3: malformed JSON"):
        read_records(path, RecordSchema("t2i"))


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_non_utf8_byte_is_reported_at_its_own_line(tmp_path, ext):
    """Line 14 of 20 holds a Latin-1 byte: the error names line 14 (a text decoder reading ahead in chunks used to
    report the chunk's first line)."""
    path = tmp_path / f"latin1.{ext}"
    if ext == "jsonl":
        lines = [json.dumps(t2i(i)).encode() for i in range(20)]
        lines[13] = '{"query": "caf\xe9", "positive": "/img.jpg"}'.encode("latin-1")
        byte = 15
    else:
        lines = [b"query,positive"] + [f"caption {i},/img{i}.jpg".encode() for i in range(20)]
        lines[13] = "caf\xe9,/img.jpg".encode("latin-1")
        byte = 4
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(RecordFileError, match=rf"{path}:line 14: not UTF-8 text .* byte {byte} of the line"):
        read_records(path, RecordSchema("t2i"))


def test_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([t2i(0), t2i(1)], indent=1))
    with pytest.raises(RecordFileError, match="one JSON object per line"):
        read_records(path, RecordSchema("t2i"))


def test_schema_error_in_a_file_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [t2i(0), {"query": "no positive"}])
    with pytest.raises(RecordError, match=rf"{path}:line 2: missing field 'positive'"):
        read_records(path, RecordSchema("t2i"))


def test_empty_data_sets_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EmptyDatasetError, match="empty"):
        read_records(empty, RecordSchema("t2i"))
    with pytest.raises(EmptyDatasetError, match="empty"):
        first_record(empty, RecordSchema("t2i"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(EmptyDatasetError, match="no record files"):
        read_records(tmp_path / "dir", RecordSchema("t2i"))


def test_missing_path_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found"):
        read_records(tmp_path / "nope.jsonl", RecordSchema("t2i"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(RecordFileError, match="unsupported record file type '.txt'"):
        read_records(tmp_path / "d.txt", RecordSchema("t2i"))
