"""Offline embedding of corpora (issue 6): sources, shards and the writer (unit); the Ray Data job end to end (ray).

The job's vectors are checked against ``VEmbedFactoryPredictor`` on the same files, row by row through the ids, so
a vector written under the wrong id fails; bad inputs must be listed exactly; a driver killed mid-run and rerun must
leave every id exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vembed.batch.cli import add_arguments
from vembed.batch.job import block_rows, resolve_actor_pool
from vembed.batch.progress import JobProgress, index_ranges
from vembed.batch.shards import Shard, plan_shards
from vembed.batch.sources import CorpusError, load_corpus
from vembed.batch.writer import (
    FragmentWriter,
    OutputExistsError,
    OutputStore,
    embeddings_table,
    errors_table,
    fragment_table,
    read_embeddings,
    read_errors,
    writer_nodes,
)


def _vectors(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def _write_images(folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)).save(
            folder / name, format="PNG" if name.endswith("png") else "JPEG"
        )


# ------------------------------------------------------------------------------------------------- unit: shards


@pytest.mark.unit
def test_plan_shards_covers_every_position_once():
    shards = plan_shards(23, 5)
    assert [(s.start, s.stop) for s in shards] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert [s.name for s in shards][:2] == ["part-00000", "part-00001"]
    assert plan_shards(0, 5) == []
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(10, 0)


# ------------------------------------------------------------------------------------------------ unit: sources


@pytest.mark.unit
def test_folder_corpus_is_recursive_sorted_and_filtered_by_extension(tmp_path):
    _write_images(tmp_path, ["b.jpg", "a/c.png", "a/b.jpeg"])
    (tmp_path / "notes.txt").write_text("not listed")
    corpus = load_corpus(str(tmp_path))
    assert corpus.table.column("id").to_pylist() == ["a/b.jpeg", "a/c.png", "b.jpg"]
    assert corpus.table.column("source").to_pylist() == [str(tmp_path / i) for i in ["a/b.jpeg", "a/c.png", "b.jpg"]]
    with pytest.raises(CorpusError, match="manifest"):
        load_corpus(str(tmp_path), modality="text")


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_columns_are_mappable_and_relative_paths_resolve(tmp_path, fmt):
    rows = [{"key": 7, "file": "imgs/x.jpg"}, {"key": 8, "file": "/abs/y.jpg"}, {"key": 9, "file": "s3://b/z.jpg"}]
    path = tmp_path / f"m.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        path.write_text("key,file\n" + "".join(f"{r['key']},{r['file']}\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    corpus = load_corpus(str(path), id_column="key", source_column="file")
    assert corpus.table.column("id").to_pylist() == ["7", "8", "9"]
    assert corpus.table.column("source").to_pylist() == [str(tmp_path / "imgs/x.jpg"), "/abs/y.jpg", "s3://b/z.jpg"]
    rooted = load_corpus(str(path), id_column="key", source_column="file", image_root=str(tmp_path / "root"))
    assert rooted.table.column("source")[0].as_py() == str(tmp_path / "root/imgs/x.jpg")


@pytest.mark.unit
def test_manifest_problems_are_clear_errors(tmp_path):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "path": "x.jpg"}\n{"id": "a", "path": "y.jpg"}\n')
    with pytest.raises(CorpusError, match=r"repeats ids \['a'\]"):
        load_corpus(str(dup))
    with pytest.raises(CorpusError, match="no text source column.*--source-column"):
        load_corpus(str(dup), modality="text")
    with pytest.raises(CorpusError, match="no id column.*--id-column"):
        load_corpus(str(dup), id_column="key")
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.jsonl"))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(CorpusError, match="unsupported record file type"):
        load_corpus(str(tmp_path / "m.txt"))


# ------------------------------------------------------------------------------------------------- unit: writer


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["float32", "float16"])
def test_shard_files_hold_ids_sources_and_fixed_size_vectors(tmp_path, fmt):
    columns = {
        "id": np.array(["a", "b", "c"], dtype=object),
        "source": np.array(["/a.jpg", "/b.jpg", "/c.jpg"], dtype=object),
        "error": np.array(["", "BadImageError: /b.jpg: not an image", ""], dtype=object),
        "embedding": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    }
    good, bad = columns["error"] == "", columns["error"] != ""
    embeddings = embeddings_table(columns["id"][good], columns["source"][good], columns["embedding"][good], fmt)
    errors = errors_table(columns["id"][bad], columns["source"][bad], columns["error"][bad])
    store = OutputStore(str(tmp_path))
    store.open({"job": 1}, overwrite=False)
    store.write_shard(Shard(3, 30, 33), embeddings, errors)
    table = read_embeddings(str(tmp_path))
    assert table.column("id").to_pylist() == ["a", "c"]
    assert table.schema.field("embedding").type == pa.list_(pa.float16() if fmt == "float16" else pa.float32(), 4)
    np.testing.assert_allclose(_vectors(table), columns["embedding"][[0, 2]], atol=1e-3 if fmt == "float16" else 0)
    assert pq.read_table(tmp_path / "errors" / "part-00003.parquet").to_pylist() == [
        {"id": "b", "source": "/b.jpg", "error": "BadImageError: /b.jpg: not an image"}
    ]
    assert store.completed_shards() == {3} and store.embedding_dim() == 4
    assert not [p for p in tmp_path.rglob(".*")], "temporary files must be moved into place"


@pytest.mark.unit
def test_store_resumes_same_job_refuses_another_and_overwrite_starts_over(tmp_path):
    store = OutputStore(str(tmp_path))
    job = {"input": "/data", "dim": None}
    store.open(job, overwrite=False)
    store.write_shard(
        Shard(0, 0, 1), embeddings_table(["a"], ["/a"], np.ones((1, 2)), "float32"), errors_table([], [], [])
    )
    store.write_manifest({"job": job, "status": "running"})
    (tmp_path / "embeddings" / ".part-00001.parquet.tmp-dead").write_bytes(b"half a file")
    assert store.open(job, overwrite=False) == {0}
    assert not (tmp_path / "embeddings" / ".part-00001.parquet.tmp-dead").exists()
    with pytest.raises(OutputExistsError, match="differs in: dim.*--overwrite"):
        store.open({**job, "dim": 64}, overwrite=False)
    assert store.open({**job, "dim": 64}, overwrite=True) == set()
    assert store.read_manifest() is None


def _embedded_batch(positions, dim: int = 3) -> dict[str, np.ndarray]:
    """What a model actor hands its writer: rows at ``positions`` (every third one bad), vectors from the position."""
    positions = np.asarray(positions, dtype=np.int64)
    bad = positions % 3 == 2
    return {
        "position": positions,
        "id": np.array([f"id{p}" for p in positions], dtype=object),
        "source": np.array([f"/src/{p}.jpg" for p in positions], dtype=object),
        "error": np.array(["OSError: unreadable" if b else "" for b in bad], dtype=object),
        "embedding": np.where(bad[:, None], 0.0, positions[:, None] + np.arange(dim) / 10).astype(np.float32),
    }


@pytest.mark.unit
def test_workers_fragments_finish_each_shard_once_whatever_the_order_retries_and_crashes(tmp_path):
    """Batches spanning shards, in shuffled order, with a retried batch and a crashed run's fragment: every shard
    file holds each of its positions once, in order, errors apart; later copies of finished rows are dropped."""
    store = OutputStore(str(tmp_path))
    store.open({"job": 1}, overwrite=False)
    writer = FragmentWriter(store, shard_size=5, num_items=13, fmt="float32")  # shards [0,5) [5,10) [10,13)
    store.write_fragment(Shard(1, 5, 10), fragment_table(_embedded_batch([5, 6, 7]), "float32"))  # a killed run's
    rng = np.random.default_rng(1)
    order = rng.permutation(13)
    batches = [order[:4], order[4:9], order[9:]]
    reports = [writer(_embedded_batch(b)) for b in [batches[0], batches[1], batches[1], batches[2]]]  # one retry
    finished = [int(s) for r in reports for s, done in zip(r["shard"], r["done_rows"], strict=True) if done >= 0]
    assert sorted(finished) == [0, 1, 2], "each shard is finished by exactly one write"
    assert sum(int(r["rows"].sum()) for r in reports[:2] + reports[3:]) == 13
    table = read_embeddings(str(tmp_path))
    good = [p for p in range(13) if p % 3 != 2]
    assert table.column("id").to_pylist() == [f"id{p}" for p in good]
    np.testing.assert_allclose(_vectors(table), np.array([[p, p + 0.1, p + 0.2] for p in good]), rtol=1e-6)
    errors = read_errors(str(tmp_path)).column("id").to_pylist()
    assert errors == [f"id{p}" for p in range(13) if p % 3 == 2]
    assert store.fragment_shards() == set() and not list((tmp_path / "_fragments").iterdir())
    again = writer(_embedded_batch([0, 1, 12]))  # a retried task after the shards were finished
    assert again["done_rows"].tolist() == [-1, -1] and store.fragment_shards() == set()
    assert read_embeddings(str(tmp_path)).num_rows == len(good)
    assert set(writer_nodes(str(tmp_path))) == {"part-00000.parquet", "part-00001.parquet", "part-00002.parquet"}


@pytest.mark.unit
def test_fragments_that_repeat_rows_do_not_finish_a_shard_early(tmp_path):
    store = OutputStore(str(tmp_path))
    store.open({"job": 1}, overwrite=False)
    writer = FragmentWriter(store, shard_size=4, num_items=4, fmt="float16")
    writer(_embedded_batch([0, 1]))
    writer(_embedded_batch([1, 2]))  # counts add up to 4, but position 3 is missing
    assert store.completed_shards() == set()
    report = writer(_embedded_batch([3]))
    assert report["done_rows"].tolist() == [4] and report["done_errors"].tolist() == [1]
    table = read_embeddings(str(tmp_path))
    assert table.column("id").to_pylist() == ["id0", "id1", "id3"]
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 3)


@pytest.mark.unit
def test_progress_counts_shards_rows_errors_and_ranges():
    progress = JobProgress(total_shards=6, done_before=[0, 1], pending_rows=40)
    report = {
        "shard": np.array([2, 3, 3]),
        "rows": np.array([5, 5, 5]),
        "errors": np.array([1, 0, 2]),
        "done_rows": np.array([10, -1, 10]),
        "node": np.array(["n1", "n2", "n2"], dtype=object),
    }
    assert progress.update(report) == [2, 3]
    figures = progress.report()
    assert (figures["shards_done"], figures["rows"], figures["errors"]) == (4, 15, 3)
    assert figures["writer_nodes"] == {"n1": 1, "n2": 1} and figures["done_shards"] == [[0, 3]]
    assert "4/6 shards, 15/40 rows" in progress.line() and "3 errors so far" in progress.line()
    assert index_ranges({7, 0, 1, 2, 5}) == [[0, 2], [5, 5], [7, 7]]


@pytest.mark.unit
def test_block_rows_grow_with_the_corpus_up_to_a_shard():
    assert block_rows(100, batch_size=64, shard_size=4096, workers=3) == 64
    assert block_rows(20_000, batch_size=64, shard_size=4096, workers=3) == 1728
    assert block_rows(200_000, batch_size=64, shard_size=4096, workers=3) == 4096
    assert block_rows(10**9, batch_size=64, shard_size=4096, workers=300) == 4096


@pytest.mark.unit
def test_the_job_waits_for_its_pools_only_where_the_cluster_holds_them():
    from vembed.batch.pipeline import ActorPool, min_decoders, pools_fit

    two = ActorPool(2, 2, 0.0, max_decoders=4)
    assert min_decoders(two) == 2 and min_decoders(ActorPool(2, 2, 0.0, max_decoders=1)) == 1
    assert pools_fit(two, "image", {"CPU": 4}) and not pools_fit(two, "image", {"CPU": 3})
    assert pools_fit(two, "text", {"CPU": 2})  # texts have no decode stage
    assert not pools_fit(ActorPool(2, 4, 1.0), "text", {"CPU": 32, "GPU": 1})


@pytest.mark.unit
def test_actor_pool_defaults_follow_the_cluster():
    gpu = resolve_actor_pool(None, None, None, None, None, {"CPU": 32, "GPU": 4})
    assert (gpu.min_size, gpu.max_size, gpu.num_gpus, gpu.max_decoders) == (1, 4, 1.0, 28)
    half = resolve_actor_pool(None, 2, None, 0.5, 6, {"CPU": 32, "GPU": 4})
    assert (half.min_size, half.max_size, half.num_gpus, half.max_decoders) == (2, 8, 0.5, 6)
    cpu = resolve_actor_pool(None, None, None, None, None, {"CPU": 8})
    assert (cpu.min_size, cpu.max_size, cpu.num_gpus, cpu.max_decoders) == (1, 4, 0.0, 4)
    fixed = resolve_actor_pool(3, None, None, None, None, {"CPU": 2})
    assert (fixed.min_size, fixed.max_size, fixed.max_decoders) == (3, 3, 1)
    with pytest.raises(ValueError, match="min_actors <= max_actors"):
        resolve_actor_pool(None, 5, 2, None, None, {"CPU": 8})


@pytest.mark.unit
def test_cli_options():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        "--model m --input in --output out --modality text --num-actors 2 --dim 64 --format float16".split()
    )
    assert (args.modality, args.num_actors, args.dim, args.format, args.overwrite) == ("text", 2, 64, "float16", False)
    with pytest.raises(SystemExit):
        parser.parse_args("--model m --input in --output out --batch-size 0".split())


# ------------------------------------------------------------------------------------- ray: the job end to end


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, shapes_t2i) -> dict:
    """A folder of good JPEGs plus a truncated JPEG and a text file named .jpg, and a manifest that also lists a
    missing file."""
    root = tmp_path_factory.mktemp("mixed")
    good = sorted(Path(shapes_t2i["images"]).glob("*.jpg"))[:22]
    for path in good:
        shutil.copy(path, root / path.name)
    data = good[0].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    names = [p.name for p in good] + ["truncated.jpg", "notes.jpg", "gone.jpg"]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"img-{i:03d}", "path": n}) + "\n" for i, n in enumerate(names)))
    ids = {n: f"img-{i:03d}" for i, n in enumerate(names)}
    return {
        "manifest": manifest,
        "root": root,
        "ids": ids,
        "bad": {ids["truncated.jpg"], ids["notes.jpg"], ids["gone.jpg"]},
    }


@pytest.fixture(scope="module")
def image_run(ray_local, tiny_clip_dir, mixed_corpus, tmp_path_factory) -> dict:
    from vembed.batch import embed_corpus

    output = tmp_path_factory.mktemp("image_run") / "out"
    summary = embed_corpus(
        str(tiny_clip_dir),
        str(mixed_corpus["manifest"]),
        str(output),
        num_actors=2,
        max_decoders=1,
        batch_size=4,
        shard_size=8,
    )
    return {"summary": summary, "output": output}


@pytest.mark.ray
def test_job_vectors_equal_predictor_per_id_under_parallel_actors(image_run, mixed_corpus, tiny_clip_dir):
    from vembed.inference import VEmbedFactoryPredictor

    table = read_embeddings(str(image_run["output"]))
    by_name = {i: n for n, i in mixed_corpus["ids"].items()}
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(set(mixed_corpus["ids"].values()) - mixed_corpus["bad"])
    files = [str(mixed_corpus["root"] / by_name[i]) for i in ids]  # the file each id names in the manifest
    assert table.column("source").to_pylist() == files
    expected = VEmbedFactoryPredictor(str(tiny_clip_dir), device="cpu").encode_image(files, batch_size=5)
    np.testing.assert_allclose(_vectors(table), expected, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in expected}) == len(ids), "distinct images must give distinct vectors"


@pytest.mark.ray
def test_bad_files_are_listed_exactly_in_errors(image_run, mixed_corpus):
    import ray

    from vembed.batch import read_errors, read_manifest

    errors = {row["id"]: row for row in read_errors(str(image_run["output"])).to_pylist()}
    ids = mixed_corpus["ids"]
    assert set(errors) == mixed_corpus["bad"]
    assert "truncated" in errors[ids["truncated.jpg"]]["error"]
    assert "not an image" in errors[ids["notes.jpg"]]["error"]
    assert errors[ids["gone.jpg"]]["error"].startswith("FileNotFoundError")
    assert errors[ids["gone.jpg"]]["source"] == str(mixed_corpus["root"] / "gone.jpg")
    summary = image_run["summary"]
    assert (summary["items"], summary["embedded"], summary["errors"]) == (25, 22, 3)
    assert summary["coordinator_cpu_s"] > 0  # the task that executed the pipeline (not the driver) reports its CPU
    # The model actors wrote every shard (the driver saw only their reports), each recording its node.
    node = ray.get_runtime_context().get_node_id()
    assert summary["writer_nodes"] == {node: 4} and set(writer_nodes(str(image_run["output"])).values()) == {node}
    manifest = read_manifest(str(image_run["output"]))
    assert manifest["status"] == "complete" and manifest["counts"] == {
        "items": 25,
        "embedded": 22,
        "errors": 3,
        "shards": 4,
    }
    assert manifest["embedding_dim"] == 32 and manifest["normalize"] is True


@pytest.mark.ray
def test_the_pipeline_executes_in_a_coordinator_task_not_in_the_driver(ray_local):
    """Ray Data's streaming executor polls, so its CPU grows with a job's duration: it runs in the coordinator task
    and no executor thread starts in the driver, which still receives every batch once; the coordinator reports
    its CPU seconds."""
    import threading

    import ray

    from vembed.batch.coordinator import Coordinator

    dataset = ray.data.range(40, override_num_blocks=4).map_batches(lambda b: {"id": b["id"] * 2}, batch_size=None)
    coordinator = Coordinator(dataset)
    seen, executors = [], set()
    for batch in coordinator:
        seen.extend(batch["id"].tolist())
        executors |= {t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor")}
    assert sorted(seen) == list(range(0, 80, 2))
    assert not executors, executors
    assert coordinator.cpu_s is not None and coordinator.cpu_s > 0
    # the same dataset iterated here does start an executor thread in this process (what the check above would see)
    for _ in dataset.iter_batches(batch_size=None):
        executors |= {t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor")}
    assert executors


@pytest.mark.ray
def test_output_of_manifest_version_1_resumes_and_a_different_job_there_is_refused(
    image_run, mixed_corpus, tiny_clip_dir, tmp_path, capsys
):
    """A folder as the driver-written version left it (manifest version 1: the sha256 of the ordered ids, no
    progress) is resumed when it holds the same job: its shards are kept, not rewritten, and the manifest becomes
    this version's. Holding another corpus, it is refused at the CLI with one line naming the difference, exit 2."""
    import hashlib

    from vembed.batch import embed_corpus, read_manifest
    from vembed.batch.cli import main
    from vembed.batch.job import MANIFEST_VERSION

    old = tmp_path / "v1"
    shutil.copytree(image_run["output"], old)
    current = json.loads((old / "_manifest.json").read_text())
    listed = [json.loads(line)["id"] for line in mixed_corpus["manifest"].read_text().splitlines()]
    job = {key: value for key, value in current["job"].items() if key != "ids_digest"}
    runs = [{"started": "2026-11-30T10:00:00+00:00", "rows": 25, "shards_written": 4, "shards_skipped": 0}]
    v1 = {"version": 1, "model": current["model"], "runs": runs, "status": "complete", "counts": current["counts"]}
    stamps = {p.name: p.stat().st_mtime_ns for p in (old / "embeddings").iterdir()}

    (old / "_manifest.json").write_text(json.dumps({**v1, "job": {**job, "ids_sha256": "0" * 64}}))
    argv = ["--model", str(tiny_clip_dir), "--input", str(mixed_corpus["manifest"]), "--output", str(old)]
    argv += ["--num-actors=2", "--max-decoders=1", "--batch-size=4", "--shard-size=8"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "older vembed (manifest version 1; differs in: ids)" in line and "--overwrite" in line

    digest = hashlib.sha256("".join(f"{i}\n" for i in listed).encode()).hexdigest()  # what version 1 recorded
    (old / "_manifest.json").write_text(json.dumps({**v1, "job": {**job, "ids_sha256": digest}}))
    summary = embed_corpus(
        str(tiny_clip_dir), str(mixed_corpus["manifest"]), str(old), num_actors=2, batch_size=4, shard_size=8
    )
    assert (summary["shards_skipped"], summary["shards_written"], summary["embedded"]) == (4, 0, 22)
    assert {p.name: p.stat().st_mtime_ns for p in (old / "embeddings").iterdir()} == stamps, "kept, not rewritten"
    manifest = read_manifest(str(old))
    assert manifest["version"] == MANIFEST_VERSION and manifest["upgraded_from_version"] == 1
    assert manifest["job"] == current["job"] and manifest["runs"][0] == runs[0] and len(manifest["runs"]) == 2
    assert read_embeddings(str(old)).equals(read_embeddings(str(image_run["output"])))


@pytest.fixture(scope="module")
def text_run(ray_local, tiny_bert_dir, shapes_t2i, tmp_path_factory) -> dict:
    """A text corpus (with one blank text) embedded by a driver in a subprocess that this fixture SIGKILLs once the
    manifest it keeps up to date shows a finished shard (of 9), then by a rerun in this process."""
    import time

    from vembed.batch import embed_corpus
    from vembed.model import EmbeddingModel

    root = tmp_path_factory.mktemp("text_run")
    checkpoint = EmbeddingModel.from_pretrained(str(tiny_bert_dir)).save_pretrained(root / "bert")
    records = [json.loads(line) for line in Path(shapes_t2i["train.jsonl"]).read_text().splitlines()]
    records.insert(7, {"id": "blank", "query": "   "})
    manifest, output = root / "texts.jsonl", root / "out"
    manifest.write_text("".join(json.dumps({"id": r["id"], "query": r["query"]}) + "\n" for r in records))
    options = dict(modality="text", source_column="query", dim=16, batch_size=4, shard_size=8, num_actors=1)
    command = [sys.executable, "-m", "vembed.batch.cli", "--model", str(checkpoint), "--input", str(manifest)]
    command += ["--output", str(output)] + [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifest_path, seen = output / "_manifest.json", None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            seen = json.loads(manifest_path.read_text()) if manifest_path.exists() else None  # replaced atomically
            if seen and seen["progress"]["shards_done"] >= 1:
                break
            time.sleep(0.05)
        on_disk = sorted(p.name for p in (output / "embeddings").glob("part-*.parquet"))
        driver.send_signal(signal.SIGKILL)
    finally:
        logs = driver.communicate(timeout=60)[0]
    # The killed driver's actors keep writing shards until Ray notices that their owner has gone (a shard takes well
    # under a second here): count the shards on disk once nothing has changed there for 5 s.
    settled = _wait_until_unchanged(output / "embeddings", quiet_s=5.0, deadline=time.monotonic() + 120)
    state = {
        "returncode": driver.returncode,
        "logs": logs[-3000:],
        "seen": seen,
        "on_disk": on_disk,  # just before the kill
        "settled": settled,
        "parts_after_kill": sorted(p.name for p in (output / "embeddings").glob("part-*.parquet")),
    }
    (output / "embeddings" / ".part-00004.parquet.tmp-0123").write_bytes(b"half a file, as a crash leaves it")
    summary = embed_corpus(str(checkpoint), str(manifest), str(output), **options)
    return {**state, "summary": summary, "output": output, "records": records, "checkpoint": checkpoint}


def _wait_until_unchanged(directory: Path, quiet_s: float, deadline: float) -> bool:
    """Wait until the files in ``directory`` (names and sizes) stay the same for ``quiet_s`` seconds; False when
    ``deadline`` came first."""
    import time

    def listing() -> set[tuple[str, int]]:
        return {(p.name, p.stat().st_size) for p in directory.iterdir()} if directory.exists() else set()

    last, since = listing(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = listing()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return True
    return False


@pytest.mark.ray
def test_killed_driver_then_rerun_writes_every_id_exactly_once(text_run):
    """The driver is SIGKILLed mid-job; the manifest it kept named only shards that were on disk, and the rerun
    skips exactly the finished shards and writes each id once (the vectors: the next test)."""
    from vembed.batch import read_errors, read_manifest
    from vembed.inference import VEmbedFactoryPredictor

    assert text_run["returncode"] == -signal.SIGKILL, text_run["logs"]
    seen = text_run["seen"]
    assert seen is not None and seen["status"] == "running", text_run["logs"]
    assert 1 <= seen["progress"]["shards_done"] < 9, "the kill must come mid-job"
    listed = {
        f"part-{i:05d}.parquet" for first, last in seen["progress"]["done_shards"] for i in range(first, last + 1)
    }
    assert listed <= set(text_run["on_disk"]), "every shard the manifest called done was on disk"
    assert seen["progress"]["rows_pending"] == len(text_run["records"]) and seen["progress"]["shards_total"] == 9
    # Workers finish shards on their own until the job's actors go, so a few more than the manifest said may be done.
    assert text_run["settled"], "the killed driver's actors must stop writing shards"
    killed_with = len(text_run["parts_after_kill"])
    assert 1 <= killed_with < 9
    output = str(text_run["output"])
    ids = read_embeddings(output).column("id").to_pylist() + read_errors(output).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(r["id"] for r in text_run["records"])  # no gaps
    summary = text_run["summary"]
    assert (summary["shards"], summary["shards_skipped"], summary["shards_written"]) == (
        9,
        killed_with,
        9 - killed_with,
    )
    assert not list(Path(output).rglob(".*tmp*")), "the crash's temporary file must be cleaned up"
    assert not (Path(output) / "_fragments").exists() or not list((Path(output) / "_fragments").iterdir())
    manifest = read_manifest(output)
    assert manifest["status"] == "complete" and [run["shards_written"] for run in manifest["runs"]] == [9 - killed_with]
    assert manifest["progress"]["shards_done"] == 9 and manifest["progress"]["done_shards"] == [[0, 8]]
    info = VEmbedFactoryPredictor(str(text_run["checkpoint"]), device="cpu").model_info
    assert manifest["job"]["vembed_json_sha256"] == info["vembed_json_sha256"] is not None


@pytest.mark.ray
def test_text_corpus_equals_predictor_encode_text(text_run):
    from vembed.batch import read_errors
    from vembed.inference import VEmbedFactoryPredictor

    output = str(text_run["output"])
    table = read_embeddings(output)
    good = [r for r in text_run["records"] if r["id"] != "blank"]
    assert table.column("id").to_pylist() == [r["id"] for r in good]  # corpus order, across both runs
    assert table.column("source").to_pylist() == [r["query"] for r in good]
    predictor = VEmbedFactoryPredictor(str(text_run["checkpoint"]), device="cpu")
    expected = predictor.encode_text([r["query"] for r in good], dimension=16)
    np.testing.assert_allclose(_vectors(table), expected, atol=1e-5)
    assert read_errors(output).to_pylist() == [{"id": "blank", "source": "   ", "error": "empty text"}]
    summary = text_run["summary"]
    assert (summary["embedded"], summary["errors"], summary["embedding_dim"]) == (len(good), 1, 16)


@pytest.mark.ray
def test_listing_in_ray_tasks_matches_the_in_process_reader(ray_local, tmp_path, monkeypatch):
    """A folder listed by one task per subdirectory, and manifests read by Ray Data, give load_corpus's ids and
    sources in the same order; repeated ids are found across hash partitions."""
    from vembed.batch import sources
    from vembed.batch.sources import list_corpus

    def rows(listing) -> list[tuple[str, str]]:
        tables = ray_local.get(listing.blocks)
        assert [t.num_rows for t in tables] == listing.counts and len(listing) == sum(listing.counts)
        return [(r["id"], r["source"]) for t in tables for r in t.to_pylist()]

    names = ["a.jpg", "a/x.jpg", "a/b/y.png", "b/z.jpeg", "c.png", "a.b/w.jpg"]
    _write_images(tmp_path / "folder", names)
    folder = load_corpus(str(tmp_path / "folder")).table
    listed = list_corpus(str(tmp_path / "folder"))
    assert len(listed.blocks) == 5  # a.b/, a/, b/ by tasks; a.jpg and c.png listed here
    assert rows(listed) == list(zip(folder.column("id").to_pylist(), folder.column("source").to_pylist(), strict=True))

    records = [{"key": k, "file": f"imgs/{i}.jpg"} for i, k in enumerate(["007", "x1", "x2"])]
    records.append({"key": "8", "file": "/abs/y.jpg"})
    for fmt in ("jsonl", "csv", "parquet"):
        path = tmp_path / f"m.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        elif fmt == "csv":
            path.write_text("key,file\n" + "".join(f"{r['key']},{r['file']}\n" for r in records))
        else:
            pq.write_table(pa.Table.from_pylist(records), path)
        expected = load_corpus(str(path), id_column="key", source_column="file").table
        got = rows(list_corpus(str(path), id_column="key", source_column="file"))
        assert got == list(
            zip(expected.column("id").to_pylist(), expected.column("source").to_pylist(), strict=True)
        ), fmt
        assert got[0][0] == "007"  # ids stay text

    monkeypatch.setattr(sources, "IDS_PER_PARTITION", 2)  # 7 ids -> 4 hash partitions
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        "".join(json.dumps({"id": i, "path": f"{i}.jpg"}) + "\n" for i in ["a", "b", "c", "a", "d", "c", "e"])
    )
    with pytest.raises(CorpusError, match=r"repeats ids \['a', 'c'\]"):
        list_corpus(str(dup))
    with pytest.raises(CorpusError, match="no id column.*--id-column"):
        list_corpus(str(dup), id_column="key")
