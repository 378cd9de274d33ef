"""The Ray Data training pipeline on a real local Ray: batch layout, equal sizes, bad records, order, errors."""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from vembed.data.batching import build_batch
from vembed.data.pipeline import BadRecordCounter, PickledPreprocessor, build_train_dataset, iter_train_batches
from vembed.data.processing import Preprocessor
from vembed.data.readers import EmptyDatasetError, read_records
from vembed.data.records import RecordError, RecordSchema
from vembed.testing import make_shapes_dataset


@pytest.fixture(scope="module")
def clip_pre(tiny_clip_dir) -> Preprocessor:
    return Preprocessor.from_pretrained(tiny_clip_dir)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def t2i_with_bad_records(tmp_path_factory) -> tuple[Path, int, int]:
    """22 good t2i records (1 negative each) with 3 bad ones mixed in: (path, good, bad)."""
    root = tmp_path_factory.mktemp("pipeline_t2i")
    paths = make_shapes_dataset(root, num_train=22, num_val=0, num_test=0, num_negatives=1)
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    (root / "notes.jpg").write_text("not an image")
    (root / "truncated.jpg").write_bytes(Path(records[0]["positive"]).read_bytes()[:150])
    for i, image in enumerate(["missing.jpg", "notes.jpg", "truncated.jpg"]):
        records.insert(5 + 7 * i, {**records[i], "id": f"bad-{i}", "positive": str(root / image)})
    return write_jsonl(root / "mixed.jsonl", records), 22, 3


def reported(failure: pytest.ExceptionInfo) -> str:
    """What the user sees: the whole chain Ray raises (the worker's exception is the cause of Ray's wrapper)."""
    return "".join(traceback.format_exception(failure.value))


def rows_of(batches: list[dict[str, torch.Tensor]]) -> list[tuple]:
    """Each row as (label, real query tokens): identifies a record independently of padding."""
    return [
        (int(label), tuple(ids[mask.bool()].tolist()))
        for b in batches
        for label, ids, mask in zip(b["labels"], b["query_input_ids"], b["query_attention_mask"], strict=True)
    ]


@pytest.mark.ray
def test_equal_batches_bad_records_counted_and_seeded_epoch_order(ray_local, t2i_with_bad_records, clip_pre):
    path, good, num_bad = t2i_with_bad_records
    from vembed.data.pipeline import EpochClock

    counter, clock = BadRecordCounter(), EpochClock()
    cfg = {"retrieval_mode": "t2i", "shuffle": True, "shuffle_seed": 3}
    ds = build_train_dataset(path, clip_pre, cfg, bad_records=counter, epoch_clock=clock)

    epoch0 = list(iter_train_batches(ds, batch_size=4, cfg=cfg, epoch=0, epoch_clock=clock))
    assert len(epoch0) == good // 4  # 22 good rows -> 5 full batches, the partial one dropped
    for batch in epoch0:
        assert set(batch) == {
            "query_input_ids",
            "query_attention_mask",
            "positive_pixel_values",
            "negative_pixel_values",
            "labels",
        }
        assert batch["positive_pixel_values"].shape == (4, 3, 32, 32)
        assert batch["negative_pixel_values"].shape == (4, 1, 3, 32, 32)
        assert batch["query_input_ids"].shape == batch["query_attention_mask"].shape
        assert batch["query_input_ids"].shape[0] == 4
        assert batch["query_attention_mask"][:, -1].any()  # padded to this batch's longest text, not max_length
    assert counter.total() == num_bad
    assert sorted(b.record_id for b in counter.examples()) == ["bad-0", "bad-1", "bad-2"]
    assert all(str(path) in b.source for b in counter.examples())

    again = list(iter_train_batches(ds, batch_size=4, cfg=cfg, epoch=0, epoch_clock=clock))
    epoch1 = list(iter_train_batches(ds, batch_size=4, cfg=cfg, epoch=1, epoch_clock=clock))
    assert rows_of(again) == rows_of(epoch0)  # same seed and epoch: same order
    assert rows_of(epoch1) != rows_of(epoch0)  # next epoch: reshuffled
    assert counter.total() == 3 * num_bad  # every epoch re-reads, and re-counts, the bad records


@pytest.fixture(scope="module")
def t2t_files(tmp_path_factory) -> Path:
    """4 JSONL files of 12 text-only (t2t) records each, ids ``f{file}-{line}``: cheap to preprocess."""
    root = tmp_path_factory.mktemp("pipeline_t2t")
    for f in range(4):
        records = [
            {"id": f"f{f}-{i}", "query": f"a red circle {f} {i}", "positive": f"blue square {i} {f}"} for i in range(12)
        ]
        write_jsonl(root / f"part{f}.jsonl", records)
    return root


@pytest.mark.ray
def test_every_epoch_reshuffles_files_windows_and_rows_and_a_resumed_run_sees_the_same_order(
    ray_local, t2t_files, clip_pre
):
    from vembed.data.pipeline import EpochClock, read_record_dataset

    cfg = {"retrieval_mode": "t2t", "shuffle": True, "shuffle_seed": 3}

    def record_ids(clock, epoch):
        clock.set(epoch)
        ds = read_record_dataset(t2t_files, cfg, clock)
        ds.context.execution_options.preserve_order = True
        return [row["id"] for row in ds.iter_rows()]

    clock = EpochClock()
    ids0, ids1, ids0_again = record_ids(clock, 0), record_ids(clock, 1), record_ids(clock, 0)
    assert sorted(ids0) == sorted(ids1) and len(ids0) == 48
    assert ids0_again == ids0  # (seed, epoch) fixes the order
    assert record_ids(EpochClock(), 1) == ids1  # a new driver resuming at epoch 1 reads epoch 1's order

    def file_order(ids):
        return list(dict.fromkeys(i.split("-")[0] for i in ids))

    def in_file_order(ids, f):
        return [i for i in ids if i.startswith(f"{f}-")]

    assert file_order(ids0) != file_order(ids1), "file level: each epoch reads the files in another order"
    assert all(in_file_order(ids0, f) != in_file_order(ids1, f) for f in ("f0", "f1", "f2", "f3")), "window level"

    def epoch_rows(ds, clock, epoch):
        """Each batch's rows as their real query tokens."""
        batches = iter_train_batches(ds, batch_size=4, cfg=cfg, epoch=epoch, epoch_clock=clock)
        return [
            [
                tuple(ids[m.bool()].tolist())
                for ids, m in zip(b["query_input_ids"], b["query_attention_mask"], strict=True)
            ]
            for b in batches
        ]

    def pairs(batches):
        return {(a, b) for rows in batches for a in rows for b in rows if a < b}

    train_clock = EpochClock()
    ds = build_train_dataset(t2t_files, clip_pre, cfg, epoch_clock=train_clock)
    rows0, rows1 = epoch_rows(ds, train_clock, 0), epoch_rows(ds, train_clock, 1)
    assert len(pairs(rows0)) == 12 * 6  # 12 batches of 4 distinct rows: 6 pairs each
    shared = pairs(rows0) & pairs(rows1)
    assert len(shared) < len(pairs(rows0)) // 4, "row level: in-batch negatives change from epoch to epoch"
    resumed_clock = EpochClock()
    resumed = build_train_dataset(t2t_files, clip_pre, cfg, epoch_clock=resumed_clock)
    assert epoch_rows(resumed, resumed_clock, 1) == rows1  # a resumed run continues with epoch 1's exact batches


@pytest.mark.ray
def test_rows_are_exactly_what_build_batch_makes(ray_local, tmp_path, clip_pre):
    """Without shuffling, pipeline batch i == build_batch(records of batch i): one preprocessing path."""
    paths = make_shapes_dataset(tmp_path, num_train=9, num_val=0, num_test=0, mode="m2t", num_negatives=2)
    cfg = {"retrieval_mode": "m2t", "shuffle": False, "preprocess_tasks": 1}
    batches = list(iter_train_batches(build_train_dataset(paths["train"], clip_pre, cfg), batch_size=3, cfg=cfg))
    records, _ = read_records(paths["train"], RecordSchema("m2t"))
    assert len(batches) == 3
    for i, batch in enumerate(batches):
        expected, _ = build_batch(records[3 * i : 3 * i + 3], clip_pre, "m2t")
        assert set(batch) == set(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(batch[key].numpy(), value, err_msg=f"batch {i} {key}")


def test_a_worker_process_unpickles_the_preprocessor_once(clip_pre, tmp_path):
    """Tasks ship the preprocessor as bytes; each process unpickles it on first use and reuses it after."""
    shipped = PickledPreprocessor(clip_pre)
    first = shipped.get()
    assert first is not clip_pre  # a copy, as in a Ray worker process
    assert shipped.get() is first
    assert PickledPreprocessor(clip_pre).digest == shipped.digest  # equal content, one cache entry
    paths = make_shapes_dataset(tmp_path, num_train=4, num_val=0, num_test=0)
    records, _ = read_records(paths["train"], RecordSchema("t2i"))
    expected, _ = build_batch(records, clip_pre, "t2i")
    for key, value in build_batch(records, first, "t2i")[0].items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


@pytest.mark.ray
def test_fail_policy_and_malformed_lines_fail_the_job_clearly(ray_local, t2i_with_bad_records, tmp_path, clip_pre):
    path, _, _ = t2i_with_bad_records
    cfg = {"retrieval_mode": "t2i", "on_bad_record": "fail", "shuffle": False}
    with pytest.raises(Exception) as failure:
        list(iter_train_batches(build_train_dataset(path, clip_pre, cfg), batch_size=4, cfg=cfg))
    assert re.search(r"BadRecordError: bad record 'bad-0' at .*mixed.jsonl:line 6: .*missing.jpg", reported(failure))

    lines = path.read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([*lines[:3], '{"query": "a cat", "positive": ', *lines[3:6]]) + "\n")
    with pytest.raises(Exception) as failure:
        list(iter_train_batches(build_train_dataset(broken, clip_pre, cfg), batch_size=4, cfg=cfg))
    assert f"RecordFileError: {broken}:line 4: malformed JSON" in reported(failure)


@pytest.mark.unit
def test_empty_or_misconfigured_data_fails_before_any_worker_starts(tmp_path, clip_pre):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmptyDatasetError, match="empty"):
        build_train_dataset(empty, clip_pre, {})
    wrong_mode = write_jsonl(tmp_path / "captions.jsonl", [{"caption": "a cat", "image": "/a.jpg"}])
    with pytest.raises(RecordError, match="missing field 'query'.*column_mapping"):
        build_train_dataset(wrong_mode, clip_pre, {"retrieval_mode": "t2i"})


@pytest.mark.unit
def test_the_worker_collate_copies_ray_read_only_arrays_into_writable_tensors():
    from vembed.data.pipeline import collate_train_batch

    pixels = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    ids = np.array([[5, 6, 0], [7, 0, 0]])
    batch = {"positive_pixel_values": pixels, "query_input_ids": ids, "query_attention_mask": (ids > 0).astype(int)}
    for array in batch.values():
        array.flags.writeable = False  # as Ray hands them out: views of its object store
    out = collate_train_batch(batch)
    assert out["query_input_ids"].tolist() == [[5, 6], [7, 0]]  # trimmed to the longest text
    assert torch.equal(out["positive_pixel_values"], torch.from_numpy(pixels.copy()))
    out["positive_pixel_values"].add_(1)  # the training step may modify its batch ...
    assert pixels[0, 0, 0, 0] == 0  # ... without touching Ray's memory
