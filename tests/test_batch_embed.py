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
from vembed.batch.job import resolve_actor_pool, split_rows
from vembed.batch.shards import Shard, ShardAssembler, plan_shards
from vembed.batch.sources import CorpusError, load_corpus
from vembed.batch.writer import OutputExistsError, OutputStore, embeddings_table, errors_table, read_embeddings


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


@pytest.mark.unit
def test_assembler_rebuilds_shards_in_position_order_from_shuffled_batches():
    pending = [Shard(0, 0, 4), Shard(2, 8, 11)]  # shard 1 already done
    assembler = ShardAssembler(pending, shard_size=4)
    rng = np.random.default_rng(0)
    positions = rng.permutation([0, 1, 2, 3, 8, 9, 10])
    completed = []
    for chunk in np.array_split(positions, 3):
        batch = {"position": chunk, "id": np.array([f"id{p}" for p in chunk], dtype=object)}
        completed += list(assembler.add(batch))
    assert sorted(shard.index for shard, _ in completed) == [0, 2]
    for shard, columns in completed:
        assert columns["position"].tolist() == list(range(shard.start, shard.stop))
        assert columns["id"].tolist() == [f"id{p}" for p in range(shard.start, shard.stop)]
    assert assembler.remaining == 0 and assembler.open_shards == 0


@pytest.mark.unit
def test_assembler_refuses_rows_of_done_shards_and_duplicates():
    assembler = ShardAssembler([Shard(0, 0, 2)], shard_size=2)
    with pytest.raises(RuntimeError, match="shard 1"):
        list(assembler.add({"position": np.array([2])}))
    with pytest.raises(RuntimeError, match="duplicates or gaps"):
        list(assembler.add({"position": np.array([1, 1])}))


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
    embeddings, errors = split_rows(columns, fmt)
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
    assert summary["max_open_shards"] == 1  # rows stream in order: the driver holds one partial shard at a time
    manifest = read_manifest(str(image_run["output"]))
    assert manifest["status"] == "complete" and manifest["counts"] == {
        "items": 25,
        "embedded": 22,
        "errors": 3,
        "shards": 4,
    }
    assert manifest["embedding_dim"] == 32 and manifest["normalize"] is True


@pytest.fixture(scope="module")
def text_run(ray_local, tiny_bert_dir, shapes_t2i, tmp_path_factory) -> dict:
    """A text corpus (with one blank text) embedded by a driver that kills itself after 2 of its 9 shards, in a
    subprocess, then by a rerun in this process."""
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
    command += ["--output", str(output), "--fail-after-shards", "2"]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    state = {
        "returncode": killed.returncode,
        "stderr": killed.stderr[-3000:],
        "parts_after_kill": sorted(p.name for p in (output / "embeddings").glob("part-*.parquet")),
        "status_after_kill": json.loads((output / "_manifest.json").read_text())["status"],
    }
    (output / "embeddings" / ".part-00004.parquet.tmp-0123").write_bytes(b"half a file, as a crash leaves it")
    summary = embed_corpus(str(checkpoint), str(manifest), str(output), **options)
    return {**state, "summary": summary, "output": output, "records": records, "checkpoint": checkpoint}


@pytest.mark.ray
def test_killed_driver_then_rerun_writes_every_id_exactly_once(text_run):
    from vembed.batch import read_errors, read_manifest
    from vembed.inference import VEmbedFactoryPredictor

    assert text_run["returncode"] == -signal.SIGKILL, text_run["stderr"]
    assert text_run["parts_after_kill"] == ["part-00000.parquet", "part-00001.parquet"]
    assert text_run["status_after_kill"] == "running"
    output = str(text_run["output"])
    ids = read_embeddings(output).column("id").to_pylist() + read_errors(output).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(r["id"] for r in text_run["records"])  # no gaps
    summary = text_run["summary"]
    assert (summary["shards"], summary["shards_skipped"], summary["shards_written"]) == (9, 2, 7)
    assert not list(Path(output).rglob(".*tmp*")), "the crash's temporary file must be cleaned up"
    manifest = read_manifest(output)
    assert manifest["status"] == "complete" and [run["shards_written"] for run in manifest["runs"]] == [7]
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
