"""``cache_preprocessed``: later epochs reuse the rows the first one preprocessed, and change nothing else.

Pipeline-level checks on the session Ray (cached batches equal streaming ones, per epoch, after a resume, with bad
records and past the budget), the ``auto`` decision, and one real Ray Train run through the cache. Also the Train
worker's loader, which starts each next epoch early: its batches are the streaming ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from vembed.config import ConfigError, as_config
from vembed.data.batching import BadRecord
from vembed.data.pipeline import (
    BadRecordCounter,
    EpochClock,
    PreprocessedCache,
    build_train_dataset,
    cache_budget,
    iter_train_batches,
)
from vembed.data.processing import Preprocessor
from vembed.data.run_state import RunState
from vembed.testing import make_shapes_dataset

CFG = {"retrieval_mode": "t2i", "shuffle": True, "shuffle_seed": 5}


@pytest.fixture(scope="module")
def clip_pre(tiny_clip_dir) -> Preprocessor:
    return Preprocessor.from_pretrained(tiny_clip_dir)


def mixed_records(root: Path, num_good: int = 22) -> Path:
    """``num_good`` t2i records with 3 bad ones (missing, not an image, truncated) mixed in, in two files (so the
    file order is shuffled too)."""
    paths = make_shapes_dataset(root, num_train=num_good, num_val=0, num_test=0, num_negatives=1)
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    (root / "notes.jpg").write_text("not an image")
    (root / "truncated.jpg").write_bytes(Path(records[0]["positive"]).read_bytes()[:150])
    for i, image in enumerate(["missing.jpg", "notes.jpg", "truncated.jpg"]):
        records.insert(5 + 7 * i, {**records[i], "id": f"bad-{i}", "positive": str(root / image)})
    data = root / "records"
    data.mkdir()
    half = len(records) // 2
    for name, part in (("a.jsonl", records[:half]), ("b.jsonl", records[half:])):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return data


def epoch_batches(ds, clock, epoch: int) -> list[dict[str, torch.Tensor]]:
    return list(iter_train_batches(ds, batch_size=4, cfg=CFG, epoch=epoch, epoch_clock=clock))


def assert_same_batches(got: list[dict[str, torch.Tensor]], expected: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), "every tensor of every batch is the streaming one"


@pytest.mark.ray
def test_state_objects_sharing_one_run_state_keep_their_own_values(ray_local):
    state = RunState()
    first, second = EpochClock(state=state), EpochClock(state=state)
    counter, other_counter = BadRecordCounter(state=state), BadRecordCounter()
    first.set(3)
    assert (first.get(), second.get()) == (3, 0)
    counter.add([("r1", "a.jsonl:1", "no image"), ("r2", "a.jsonl:2", "no image")])
    assert (counter.total(), other_counter.total()) == (2, 0)
    assert [b.record_id for b in counter.examples()] == ["r1", "r2"]
    cache = PreprocessedCache(budget_bytes=0, state=state)  # no room: rows are not kept, bad records are
    cache.add(["a.jsonl:3"], {"x": torch.zeros(1, 2).numpy()}, [BadRecord("r4", "a.jsonl:4", "no image")])
    assert cache.stats() == {"rows": 0, "bad": 1, "bytes": 0, "budget": 0}
    assert cache.lookup(["a.jsonl:3", "a.jsonl:4"]) == [None, (None, ("r4", "a.jsonl:4", "no image"))]


@pytest.mark.ray
def test_cached_epochs_yield_the_streaming_batches_bad_counts_and_resume(ray_local, tmp_path, clip_pre):
    data = mixed_records(tmp_path)

    def run(cache, state=None):
        clock, counter = EpochClock(state=state), BadRecordCounter(state=state)
        ds = build_train_dataset(data, clip_pre, CFG, bad_records=counter, epoch_clock=clock, cache=cache)
        return ds, clock, counter

    streaming, s_clock, s_bad = run(None)
    expected = [epoch_batches(streaming, s_clock, epoch) for epoch in (0, 1)]
    assert s_bad.total() == 6  # 3 bad records, counted in each epoch
    assert [len(b) for b in expected] == [5, 5]  # 22 good rows: 5 full batches of 4

    state = RunState()  # as a training run holds them: clock, counter and cache in one actor
    cache = PreprocessedCache(state=state)
    cached, c_clock, c_bad = run(cache, state)
    assert_same_batches(epoch_batches(cached, c_clock, 0), expected[0])  # the epoch that fills the cache
    assert cache.stats()["rows"] == 22 and cache.stats()["bad"] == 3
    assert c_bad.total() == 3

    # A resumed driver (new clock, new, empty cache) starting at epoch 1 sees epoch 1's exact batches.
    resumed, r_clock, _ = run(PreprocessedCache())
    assert_same_batches(epoch_batches(resumed, r_clock, 1), expected[1])

    # With the images gone, only the cache can still produce the rows: epoch 1 comes from it, reshuffled by
    # (seed, epoch) as streaming reshuffles it, and its bad records are counted again, as streaming counts them.
    shutil.move(tmp_path / "images", tmp_path / "images-moved")
    try:
        assert_same_batches(epoch_batches(cached, c_clock, 1), expected[1])
        assert c_bad.total() == s_bad.total() == 6
        assert cache.stats()["rows"] == 22
    finally:
        shutil.move(tmp_path / "images-moved", tmp_path / "images")


@pytest.mark.ray
def test_data_larger_than_the_cache_budget_still_streams_the_same_batches(ray_local, tmp_path, clip_pre):
    data = mixed_records(tmp_path, num_good=70)  # 73 records: three preprocessing calls of up to 32
    clock = EpochClock()
    streaming = build_train_dataset(data, clip_pre, CFG, epoch_clock=clock)
    expected = [epoch_batches(streaming, clock, epoch) for epoch in (0, 1)]

    row_bytes = sum(t[0].numel() * t.element_size() for t in expected[0][0].values())  # about one row
    cache = PreprocessedCache(budget_bytes=40 * row_bytes)  # room for one call's rows, not for 70
    clock = EpochClock()
    partly = build_train_dataset(data, clip_pre, CFG, epoch_clock=clock, cache=cache)
    for epoch in (0, 1):
        assert_same_batches(epoch_batches(partly, clock, epoch), expected[epoch])
    stats = cache.stats()
    assert 0 < stats["rows"] < 70 and stats["bytes"] <= stats["budget"], stats

    # A single worker's replay with the same budget: the epoch does not fit, so every epoch streams.
    from vembed.data.epoch_replay import EpochReplay
    from vembed.training.worker import ShardLoader

    clock = EpochClock()
    cfg = as_config({**CFG, "epochs": 2, "data_path": str(data)})
    replay = EpochReplay(cfg, 40 * row_bytes)
    loader = ShardLoader(build_train_dataset(data, clip_pre, CFG, epoch_clock=clock), 4, cfg, True, clock, replay)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        assert_same_batches(list(loader), expected[epoch])
    assert not replay.ready and replay.nbytes == 0 and loader.metrics()["epochs_replayed"] == 0


@pytest.mark.ray
def test_auto_caches_what_fits_a_share_of_the_object_store_and_streams_the_rest(ray_local, shapes_t2i, clip_pre):
    path = shapes_t2i["train"]
    auto = as_config({**CFG, "cache_preprocessed": "auto"})
    budget = cache_budget(auto, 100, clip_pre, path)
    store = ray_local.cluster_resources()["object_store_memory"]
    assert budget == pytest.approx(0.25 * store)
    assert cache_budget(auto, int(store), clip_pre, path) is None  # far more rows than fit: stream
    assert cache_budget(as_config({**CFG, "cache_preprocessed": True}), int(store), clip_pre, path) == float("inf")
    assert cache_budget(as_config({**CFG, "cache_preprocessed": False}), 100, clip_pre, path) is None
    one_epoch = as_config({**CFG, "cache_preprocessed": "auto", "epochs": 1})
    assert cache_budget(one_epoch, 100, clip_pre, path) is None  # no later epoch would read the cache


@pytest.mark.unit
def test_cache_preprocessed_is_auto_true_or_false():
    assert as_config({}).cache_preprocessed == "auto"
    assert as_config({"cache_preprocessed": True}).cache_preprocessed is True
    with pytest.raises(ConfigError, match="cache_preprocessed"):
        as_config({"cache_preprocessed": "sometimes"})


@pytest.mark.ray
def test_a_ray_train_run_reads_its_later_epochs_from_the_cache(ray_local, tiny_clip_dir, tmp_path, caplog):
    from vembed.training.launcher import run_training

    data = mixed_records(tmp_path, num_good=13)
    cfg = {
        **CFG,
        "model_name": str(tiny_clip_dir),
        "data_path": str(data),
        "output_dir": str(tmp_path / "out"),
        "batch_size": 4,
        "epochs": 2,
        "num_workers": 1,
        "torch_threads": 1,
        "cache_preprocessed": True,
        "mixed_precision": "no",
    }
    with caplog.at_level(logging.INFO, logger="vembed.training.launcher"):
        result = run_training(cfg)
    assert result.error is None and result.metrics["step"] == 6  # 13 good rows: 3 batches of 4 per epoch
    assert result.metrics["bad_records"] == 6  # 3 bad records, counted in each epoch as streaming counts them
    assert "later epochs replayed from memory" in caplog.text
    assert result.metrics["epochs_replayed"] == 1 and result.metrics["replay_bytes"] > 0  # epoch 2 of 2
    assert result.metrics["time_window_s"] > 0 and result.metrics["time_forward_backward_s"] > 0


@pytest.mark.ray
def test_a_single_worker_replays_later_epochs_from_memory_as_they_stream_with_their_bad_counts(
    ray_local, tmp_path, clip_pre
):
    from vembed.data.epoch_replay import EpochReplay
    from vembed.training.worker import ShardLoader

    data = mixed_records(tmp_path)
    s_clock, s_bad = EpochClock(), BadRecordCounter()
    streaming = build_train_dataset(data, clip_pre, CFG, bad_records=s_bad, epoch_clock=s_clock)
    expected = [epoch_batches(streaming, s_clock, epoch) for epoch in (0, 1, 2)]
    assert s_bad.total() == 9  # 3 bad records in each of 3 epochs
    cfg = as_config({**CFG, "epochs": 3, "data_path": str(data)})

    def loader_from(epoch: int) -> tuple[ShardLoader, EpochClock, BadRecordCounter]:
        clock, bad = EpochClock(), BadRecordCounter()
        ds = build_train_dataset(data, clip_pre, CFG, bad_records=bad, epoch_clock=clock)
        loader = ShardLoader(
            ds, 4, cfg, train=True, epoch_clock=clock, replay=EpochReplay(cfg, float("inf"), bad, clip_pre)
        )
        loader.set_epoch(epoch)
        return loader, clock, bad

    # A worker (re)started at epoch 1 -- a resumed run -- streams epoch 1 and replays epoch 2.
    resumed, _, _ = loader_from(1)
    assert_same_batches(list(resumed), expected[1])
    resumed.set_epoch(2)
    assert_same_batches(list(resumed), expected[2])
    assert resumed.metrics()["epochs_replayed"] == 1

    loader, clock, bad = loader_from(0)
    assert_same_batches(list(loader), expected[0])
    assert loader.replaying and clock.get() == 0, "no Ray Data execution is started for a replayed epoch"
    # With the images gone, only the kept rows can make epochs 1 and 2: in streaming's (seed, epoch) order, with
    # the bad records preprocessed and counted again, as streaming counts them.
    shutil.move(tmp_path / "images", tmp_path / "images-moved")
    try:
        for epoch in (1, 2):
            loader.set_epoch(epoch)
            assert_same_batches(list(loader), expected[epoch])
    finally:
        shutil.move(tmp_path / "images-moved", tmp_path / "images")
    assert bad.total() == s_bad.total() and clock.get() == 0
    assert loader.metrics()["epochs_replayed"] == 2


@pytest.mark.ray
def test_a_vlm_worker_replays_its_ragged_rows_as_they_stream(ray_local, tmp_path, tiny_qwen3_vl_dir):
    """Qwen3-VL rows are ragged (per-row tokens, patches and grids in object columns): replayed, they still make
    the streaming batches."""
    from vembed.data.epoch_replay import EpochReplay
    from vembed.training.worker import ShardLoader

    pre = Preprocessor.from_pretrained(tiny_qwen3_vl_dir)
    data = mixed_records(tmp_path, num_good=10)
    s_clock = EpochClock()
    streaming = build_train_dataset(data, pre, CFG, epoch_clock=s_clock)
    expected = [epoch_batches(streaming, s_clock, epoch) for epoch in (0, 1)]
    cfg = as_config({**CFG, "epochs": 2, "data_path": str(data)})
    clock = EpochClock()
    replay = EpochReplay(cfg, float("inf"), preprocessor=pre)
    loader = ShardLoader(build_train_dataset(data, pre, CFG, epoch_clock=clock), 4, cfg, True, clock, replay)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        assert_same_batches(list(loader), expected[epoch])
    assert loader.metrics()["epochs_replayed"] == 1


@pytest.mark.ray
def test_the_worker_loader_starts_the_next_epoch_early_and_yields_the_streaming_batches(ray_local, tmp_path, clip_pre):
    from vembed.training.worker import ShardLoader

    data = mixed_records(tmp_path)
    s_clock = EpochClock()
    streaming = build_train_dataset(data, clip_pre, CFG, epoch_clock=s_clock)
    expected = [epoch_batches(streaming, s_clock, epoch) for epoch in (0, 1, 2)]

    clock = EpochClock()
    ds = build_train_dataset(data, clip_pre, CFG, epoch_clock=clock, cache=PreprocessedCache())
    loader = ShardLoader(ds, 4, as_config({**CFG, "epochs": 3}), train=True, epoch_clock=clock)
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        assert_same_batches(list(loader), expected[epoch])  # epochs 1 and 2 were started under the previous one
    assert clock.get() == 2, "no epoch past the run's last is started"
    assert not torch.equal(expected[0][0]["positive_pixel_values"], expected[1][0]["positive_pixel_values"])

    loader = ShardLoader(ds, 4, as_config({**CFG, "epochs": 3}), train=True, epoch_clock=clock)
    loader.set_epoch(0)
    list(loader)
    with pytest.raises(ValueError, match="epoch 1 was started ahead but epoch 2 was asked for"):
        loader.set_epoch(2)
