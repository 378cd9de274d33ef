"""The synthetic shapes data set: every mode, every record format, labels that mean what they say."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vembed.testing.synthetic import MODES, make_shapes_dataset

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_writes_schema_records(tmp_path, mode):
    paths = make_shapes_dataset(tmp_path, num_train=6, num_val=2, num_test=2, mode=mode, num_negatives=2)
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(records) == 6
    for rec in records:
        assert {"id", "query", "positive", "negatives", "label"} <= set(rec)
        assert len(rec["negatives"]) == 2
        assert ("query_image" in rec) == mode.startswith("m")
        image_fields = {"t2i": ["positive"], "i2t": ["query"], "i2i": ["query", "positive"], "t2t": []}
        for field in image_fields.get(mode, ["query_image"]):
            with Image.open(rec[field]) as img:
                assert img.size == (32, 32)


def test_formats_hold_the_same_records(tmp_path):
    paths = make_shapes_dataset(tmp_path, num_train=5, num_val=1, num_test=1, formats=("jsonl", "csv", "parquet"))
    jsonl = [json.loads(line) for line in paths["train.jsonl"].read_text().splitlines()]
    table = pq.read_table(paths["train.parquet"]).to_pylist()
    assert [r["query"] for r in jsonl] == [r["query"] for r in table]
    assert paths["train.csv"].read_text().count("\n") == 6


def test_captions_name_the_class(tmp_path):
    from vembed.testing.synthetic import COLOURS, SHAPES

    paths = make_shapes_dataset(tmp_path, num_train=20, num_val=1, num_test=1)
    for rec in map(json.loads, paths["train"].read_text().splitlines()):
        colour = list(COLOURS)[rec["label"] // len(SHAPES)]
        shape = SHAPES[rec["label"] % len(SHAPES)]
        assert f"{colour} {shape}" in rec["query"]
