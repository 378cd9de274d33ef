"""build_batch for every mode, bad-record policy, padding helpers, the torch Dataset, collators and their registry."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vembed.data.batching import BadRecordError, build_batch, pad_text, trim_text_padding
from vembed.data.collators import DefaultCollator
from vembed.data.dataset import VisualRetrievalDataset
from vembed.data.images import load_image
from vembed.data.processing import Preprocessor
from vembed.data.records import RETRIEVAL_MODES, SOURCE_FIELD
from vembed.data.registry import CollatorRegistry, UnknownCollatorError
from vembed.testing import make_shapes_dataset

pytestmark = pytest.mark.unit

K = 2


@pytest.fixture(scope="module")
def clip_pre(tiny_clip_dir) -> Preprocessor:
    return Preprocessor.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="module")
def mode_records(tmp_path_factory) -> dict[str, list[dict]]:
    """Three records with K hard negatives for every retrieval mode."""
    out = {}
    for mode in RETRIEVAL_MODES:
        paths = make_shapes_dataset(
            tmp_path_factory.mktemp(mode), num_train=3, num_val=0, num_test=0, mode=mode, num_negatives=K
        )
        out[mode] = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    return out


def expected_keys(mode: str) -> set[str]:
    text, image = ("input_ids", "attention_mask"), ("pixel_values",)
    query = {"t2i": text, "t2t": text, "i2i": image, "i2t": image}.get(mode, text + image)
    candidate = image if mode.endswith("i") else text
    return (
        {f"query_{k}" for k in query}
        | {f"positive_{k}" for k in candidate}
        | {f"negative_{k}" for k in candidate}
        | {"labels"}
    )


@pytest.mark.parametrize("mode", RETRIEVAL_MODES)
def test_every_mode_builds_the_model_layout(mode, mode_records, clip_pre):
    records = mode_records[mode]
    batch, bad = build_batch(records, clip_pre, mode)
    assert bad == []
    assert set(batch) == expected_keys(mode)
    b = len(records)
    for key, value in batch.items():
        assert isinstance(value, np.ndarray)
        if key.endswith("pixel_values"):
            assert value.dtype == np.float32
            assert value.shape == ((b, K, 3, 32, 32) if key.startswith("negative") else (b, 3, 32, 32))
        elif key != "labels":
            assert value.dtype == np.int64
            assert value.shape[:-1] == ((b, K) if key.startswith("negative") else (b,))
    np.testing.assert_array_equal(batch["labels"], [r["label"] for r in records])

    # Independent reference: each role through the Preprocessor directly, record by record.
    query_image_field = "query_image" if mode.startswith("m") else "query"
    if "query_pixel_values" in batch:
        ref = clip_pre.process_images([load_image(r[query_image_field]) for r in records])
        np.testing.assert_array_equal(batch["query_pixel_values"], ref)
    if "negative_pixel_values" in batch:
        ref = clip_pre.process_images([load_image(records[1]["negatives"][1])])[0]
        np.testing.assert_array_equal(batch["negative_pixel_values"][1, 1], ref)
    if "negative_input_ids" in batch:
        ref = clip_pre.process_texts([records[2]["negatives"][0]])
        length = ref["input_ids"].shape[1]
        np.testing.assert_array_equal(batch["negative_input_ids"][2, 0, :length], ref["input_ids"][0])
        assert batch["negative_attention_mask"][2, 0].sum() == ref["attention_mask"].sum()


def test_text_only_model_builds_t2t_batches(tiny_bert_dir, mode_records):
    pre = Preprocessor.from_pretrained(tiny_bert_dir)
    batch, _ = build_batch(mode_records["t2t"], pre, "t2t", with_negatives=False)
    assert set(batch) == {
        "query_input_ids",
        "query_attention_mask",
        "positive_input_ids",
        "positive_attention_mask",
        "labels",
    }


# -- bad records -------------------------------------------------------------------------------------------------------


@pytest.fixture()
def bad_image_records(tmp_path, mode_records):
    good = mode_records["t2i"][0]["positive"]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good, "rb").read()[:200])
    text_as_jpg = tmp_path / "notes.jpg"
    text_as_jpg.write_text("this is not an image")
    records = [
        {"id": f"r{i}", "query": f"a shape {i}", "positive": good, "_source": f"d.jsonl:line {i + 1}"} for i in range(5)
    ]
    records[1]["positive"] = str(truncated)
    records[2]["positive"] = str(text_as_jpg)
    records[3]["positive"] = str(tmp_path / "missing.jpg")
    records[4]["query"] = "   "
    return records


def test_bad_records_are_skipped_and_reported(bad_image_records, clip_pre):
    batch, bad = build_batch(bad_image_records, clip_pre, "t2i", on_bad_record="skip")
    assert batch["positive_pixel_values"].shape[0] == 1
    assert [b.record_id for b in bad] == ["r1", "r2", "r3", "r4"]
    assert [b.source for b in bad] == [f"d.jsonl:line {i}" for i in (2, 3, 4, 5)]
    assert "truncated.jpg" in bad[0].error and "notes.jpg" in bad[1].error
    assert "missing.jpg" in bad[2].error and "query text is empty" in bad[3].error


def test_no_black_image_is_substituted(bad_image_records, clip_pre):
    """The surviving row is the good record's real image, not a placeholder."""
    batch, _ = build_batch(bad_image_records, clip_pre, "t2i")
    ref = clip_pre.process_images([load_image(bad_image_records[0]["positive"])])
    np.testing.assert_array_equal(batch["positive_pixel_values"], ref)


@pytest.mark.parametrize(("index", "name"), [(1, "truncated.jpg"), (2, "notes.jpg"), (3, "missing.jpg")])
def test_fail_policy_names_record_and_source(bad_image_records, clip_pre, index, name):
    with pytest.raises(BadRecordError, match=rf"bad record 'r{index}' at d.jsonl:line {index + 1}: .*{name}"):
        build_batch([bad_image_records[0], bad_image_records[index]], clip_pre, "t2i", on_bad_record="fail")


def test_all_bad_gives_an_empty_batch_and_unknown_policy_fails(bad_image_records, clip_pre):
    batch, bad = build_batch(bad_image_records[1:], clip_pre, "t2i")
    assert batch == {} and len(bad) == 4
    with pytest.raises(ValueError, match="on_bad_record must be one of skip, fail"):
        build_batch(bad_image_records, clip_pre, "t2i", on_bad_record="ignore")


# -- padding -----------------------------------------------------------------------------------------------------------


def test_pad_to_max_length_then_trim_equals_padding_to_the_longest(mode_records, clip_pre):
    records = mode_records["m2t"]
    longest, _ = build_batch(records, clip_pre, "m2t")
    fixed, _ = build_batch(records, clip_pre, "m2t", pad_to_max_length=True)
    assert fixed["query_input_ids"].shape[1] == clip_pre.max_text_length
    assert fixed["negative_input_ids"].shape[1:] == (K, clip_pre.max_text_length)
    trimmed = trim_text_padding(fixed)
    assert set(trimmed) == set(longest)
    for key in longest:
        np.testing.assert_array_equal(trimmed[key], longest[key], err_msg=key)


def test_left_padding_is_kept_on_the_left():
    ids = np.array([[0, 7, 8], [5, 6, 9]])
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    padded_ids, padded_mask = pad_text(ids, mask, 5, pad_id=0, side="left")
    np.testing.assert_array_equal(padded_ids, [[0, 0, 0, 7, 8], [0, 0, 5, 6, 9]])
    np.testing.assert_array_equal(padded_mask, [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    trimmed = trim_text_padding(
        {"query_input_ids": torch.tensor(padded_ids), "query_attention_mask": torch.tensor(padded_mask)}
    )
    assert trimmed["query_input_ids"].tolist() == ids.tolist()


# -- Dataset, collator, registry ---------------------------------------------------------------------------------------


def test_seed_guide_dataloader_snippet(shapes_t2i, clip_pre):
    dataset = VisualRetrievalDataset(data_source=str(shapes_t2i["train"]), processor=clip_pre, mode="train")
    collator = CollatorRegistry.get("default")(processor=clip_pre, mode="train")
    dataloader = DataLoader(dataset, batch_size=32, collate_fn=collator, shuffle=True)
    batches = list(dataloader)
    assert len(dataset) == 64 and len(batches) == 2
    for batch in batches:
        assert set(batch) == {"query_input_ids", "query_attention_mask", "positive_pixel_values", "labels"}
        assert all(isinstance(v, torch.Tensor) for v in batch.values())
        assert batch["positive_pixel_values"].shape == (32, 3, 32, 32)
        assert batch["query_input_ids"].shape[0] == 32


def test_dataset_relative_paths_column_mapping_and_eval_mode(tmp_path, mode_records, clip_pre):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i, rec in enumerate(mode_records["t2i"]):
        for j, src in enumerate([rec["positive"], *rec["negatives"]]):
            shutil.copy(src, images / f"{i}_{j}.jpg")
        rows.append({"caption": rec["query"], "image": f"{i}_0.jpg", "negatives": [f"{i}_1.jpg", f"{i}_2.jpg"]})
    mapping = {"caption": "query", "image": "positive"}
    train = VisualRetrievalDataset(rows, clip_pre, column_mapping=mapping, image_root=str(images))
    assert train[1]["positive"] == str(images / "1_0.jpg") and train[1][SOURCE_FIELD] == "data_source[1]"
    batch = train.collator()([train[i] for i in range(len(train))])
    assert batch["negative_pixel_values"].shape == (3, K, 3, 32, 32)
    cfg = {"column_mapping": mapping, "image_root": str(images), "retrieval_mode": "t2i"}
    evaluation = VisualRetrievalDataset.from_config(rows, clip_pre, cfg, mode="eval")
    assert all(r["negatives"] == [] for r in evaluation.records)
    assert "negative_pixel_values" not in evaluation.collator()(evaluation.records)


def test_dataset_rejects_bad_arguments(clip_pre):
    with pytest.raises(ValueError, match="mode must be 'train' or 'eval'"):
        VisualRetrievalDataset([{"query": "a", "positive": "/b.jpg"}], clip_pre, mode="t2i")
    with pytest.raises(ValueError, match="empty"):
        VisualRetrievalDataset([], clip_pre)


def test_collator_fails_clearly_when_a_whole_batch_is_bad(bad_image_records, clip_pre):
    collator = DefaultCollator(clip_pre)
    with pytest.raises(BadRecordError, match="all 4 records of this batch are bad"):
        collator(bad_image_records[1:])
    assert len(collator.bad_records) == 4


def test_registry_lists_known_names_and_accepts_new_collators(mode_records, clip_pre):
    with pytest.raises(UnknownCollatorError, match="unknown collator 'fancy'; registered collators: .*default"):
        CollatorRegistry.get("fancy")

    @CollatorRegistry.register("test_without_labels")
    class WithoutLabels(DefaultCollator):
        def __call__(self, records):
            batch = super().__call__(records)
            batch.pop("labels")
            return batch

    assert CollatorRegistry.get("TEST_WITHOUT_LABELS") is WithoutLabels
    assert "test_without_labels" in CollatorRegistry.names()
    batch = CollatorRegistry.get("test_without_labels")(processor=clip_pre, retrieval_mode="t2i")(mode_records["t2i"])
    assert "labels" not in batch and batch["positive_pixel_values"].shape[0] == 3
    with pytest.raises(ValueError, match="already registered"):
        CollatorRegistry.register("test_without_labels")(DefaultCollator)
