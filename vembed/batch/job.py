"""``embed_corpus``: embed a whole image folder or manifest into Parquet shards, resumably, exactly once.

Design. The corpus (ids + sources only) is listed in a stable order and cut into fixed-size shards
(:mod:`vembed.batch.shards`). Shards already in the output are skipped; the rest stream through one Ray Data
pipeline (:mod:`vembed.batch.pipeline`: decode + preprocess in CPU tasks, model actors on an autoscaling actor
pool). The driver iterates the pipeline's output, reassembles rows into their shards and writes each shard itself,
atomically, the moment its last row arrives (:mod:`vembed.batch.writer`). Ray Data's ``write_parquet`` is not used
because it names files by task, so a crash could leave a shard half-written under a name a rerun cannot recognise;
writing per shard makes "the file exists" mean "the shard is done", which is what gives exactly-once output.

Memory. Execution preserves block order, so rows reach the driver in corpus order and it holds at most the shard
being filled plus Ray Data's bounded in-flight window, whatever the corpus size. The driver also keeps the id and
source strings of the corpus (tens of bytes per item), which are needed to plan shards.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vembed.batch.options import DTYPES, FORMATS, MODALITIES
from vembed.batch.pipeline import ACTOR_CPUS, ActorPool, build_dataset, check_instruction
from vembed.batch.shards import Shard, ShardAssembler, plan_shards
from vembed.batch.sources import Corpus, load_corpus
from vembed.batch.writer import EMBEDDINGS_DIR, ERRORS_DIR, OutputStore, embeddings_table, errors_table
from vembed.modelpath import resolve_source

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def embed_corpus(
    model_path: str,
    input: str,
    output: str,
    *,
    modality: str = "image",
    id_column: str | None = None,
    source_column: str | None = None,
    image_root: str | None = None,
    batch_size: int = 64,
    shard_size: int = 4096,
    num_actors: int | None = None,
    min_actors: int | None = None,
    max_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    max_decoders: int | None = None,
    dtype: str = "float32",
    dim: int | None = None,
    format: str = "float32",
    overwrite: bool = False,
    fail_after_shards: int | None = None,
    instruction: str | None = None,
) -> dict[str, Any]:
    """Embed every item of ``input`` with the model at ``model_path`` into Parquet shards under ``output``.

    Args:
        model_path: vembed checkpoint or HF model directory (readable by the driver and every worker).
        input: image folder or JSONL/CSV/Parquet manifest, local path or pyarrow URI (see :func:`load_corpus`).
        output: output folder, local path or pyarrow URI (layout in :mod:`vembed.batch.writer`).
        modality: ``"image"`` or ``"text"``.
        id_column, source_column, image_root: how to read a manifest (see :func:`load_corpus`).
        batch_size: rows per model call (and per decode task).
        shard_size: rows per output shard; the unit of resume.
        num_actors: a fixed pool of model actors; or ``min_actors``/``max_actors`` for an autoscaling one
            (default: 1 up to one per GPU, or half the CPUs on a CPU-only cluster).
        num_gpus_per_actor: GPUs each model actor holds (default: 1 when the cluster has GPUs, else 0).
        max_decoders: most image decode workers (1 CPU each; default: the CPUs the model actors leave free).
        dtype: model compute dtype; ``dim``: Matryoshka dimension (None: full size).
        format: stored embedding dtype, ``"float32"`` or ``"float16"``.
        overwrite: delete earlier output of this layout in ``output`` and start over. Without it, a rerun of the
            same job resumes (completed shards are skipped) and a different job in ``output`` is refused.
        fail_after_shards: fault injection for tests: the driver kills itself (SIGKILL) after writing this many
            shards.
        instruction: for models that take one (a VLM's system message, Qwen3-Embedding's query task); None: the
            model's default. A ValueError before anything runs for a model without instructions.

    Returns:
        A summary: totals over the output (``items``, ``embedded``, ``errors``, ``shards``), this run's
        ``rows``, ``shards_written``, ``shards_skipped``, ``seconds``, ``rows_per_s``, ``startup_s`` (until the
        first rows came back), ``steady_rows_per_s`` (after that) and ``max_open_shards`` (most partly filled shards
        the driver held), ``embedding_dim`` and ``output``.
    """
    _check_options(modality, batch_size, dtype, dim, format, num_actors, min_actors, max_actors)
    resolve_source(model_path)  # a missing model directory fails here, before any Ray work
    started = time.time()
    corpus = load_corpus(input, modality, id_column, source_column, image_root)  # type: ignore[arg-type]
    shards = plan_shards(len(corpus), shard_size)
    model = describe_model(model_path)
    check_instruction(model["model_path"], instruction)
    job = {
        "input": corpus.origin,
        "modality": modality,
        "id_column": id_column,
        "source_column": source_column,
        "image_root": image_root,
        "items": len(corpus),
        "ids_sha256": _ids_digest(corpus),
        "shard_size": shard_size,
        "model_path": model["model_path"],
        "vembed_json_sha256": model["vembed_json_sha256"],
        "dtype": dtype,
        "dim": dim,
        "format": format,
        **({"instruction": instruction} if instruction is not None else {}),
    }
    store = OutputStore(output)
    done = store.open(job, overwrite)  # refuses a folder holding a different job
    pending = [shard for shard in shards if shard.index not in done]
    manifest = store.read_manifest() or {"version": MANIFEST_VERSION, "job": job, "model": model, "runs": []}
    store.write_manifest({**manifest, "status": "running"})

    progress: dict[str, Any] = {"rows": 0, "shards_written": 0, "max_open_shards": 0}
    if pending:
        pool = resolve_actor_pool(
            num_actors, min_actors, max_actors, num_gpus_per_actor, max_decoders, _cluster_resources()
        )
        dataset = build_dataset(
            _pending_items(corpus, pending), modality, model["model_path"], pool, batch_size, dtype, dim, instruction
        )
        progress = _write_shards(dataset, store, pending, shard_size, format, fail_after_shards)

    seconds = time.time() - started
    run = {
        "started": _iso(started),
        "finished": _iso(time.time()),
        "seconds": round(seconds, 3),
        "rows_per_s": round(progress["rows"] / seconds, 2),
        **progress,
        "shards_skipped": len(done),
    }
    counts = {
        "items": len(corpus),
        "embedded": store.count_rows(EMBEDDINGS_DIR),
        "errors": store.count_rows(ERRORS_DIR),
        "shards": len(shards),
    }
    embedding_dim = store.embedding_dim()
    store.write_manifest(
        {
            **manifest,
            "status": "complete",
            "counts": counts,
            "embedding_dim": embedding_dim,
            "normalize": bool(model["normalize"]) or dim is not None,  # a Matryoshka cut is re-normalised
            "embeddings": EMBEDDINGS_DIR,
            "errors": ERRORS_DIR,
            "runs": manifest["runs"] + [run],
        }
    )
    steady = f"; {run['steady_rows_per_s']} rows/s after {run['startup_s']} s start-up" if "startup_s" in run else ""
    print(
        f"vembed embed: {progress['rows']} rows in {seconds:.1f} s ({run['rows_per_s']} rows/s{steady}), "
        f"{counts['errors']} errors in total, {progress['shards_written']} shards written, {len(done)} already done "
        f"-> {store.root.uri}",
        flush=True,
    )
    return {**counts, **run, "embedding_dim": embedding_dim, "output": store.root.uri}


def _write_shards(
    dataset: Any, store: OutputStore, pending: list[Shard], shard_size: int, fmt: str, fail_after: int | None
) -> dict[str, Any]:
    """Stream the dataset's rows into their shards and write each shard as soon as it is complete.

    Returns this run's progress: ``rows``, ``shards_written``, ``max_open_shards``, ``startup_s`` (until the first
    rows came back: actor start-up, model loading, the first batch) and ``steady_rows_per_s`` (after that).
    """
    # In-order output: rows arrive in corpus order, so the driver holds one partly filled shard at a time.
    dataset.context.execution_options.preserve_order = True
    assembler = ShardAssembler(pending, shard_size)
    progress: dict[str, Any] = {"rows": 0, "shards_written": 0, "max_open_shards": 0}
    start = time.perf_counter()
    first: tuple[float, int] | None = None  # (time, rows) of the first batch
    received = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        received += len(batch["position"])
        first = first or (time.perf_counter(), received)
        for shard, columns in assembler.add(batch):
            store.write_shard(shard, *split_rows(columns, fmt))
            progress["rows"] += len(shard)
            progress["shards_written"] += 1
            if fail_after is not None and progress["shards_written"] >= fail_after:
                os.kill(os.getpid(), signal.SIGKILL)
        progress["max_open_shards"] = max(progress["max_open_shards"], assembler.open_shards)
    if assembler.remaining:
        raise RuntimeError(f"the pipeline ended with {assembler.remaining} shards incomplete; rerun to finish")
    if first is not None:
        after = time.perf_counter() - first[0]
        progress["startup_s"] = round(first[0] - start, 3)
        progress["steady_rows_per_s"] = round((received - first[1]) / after, 2) if after > 0 else None
    return progress


def split_rows(columns: dict[str, np.ndarray], fmt: str) -> tuple[pa.Table, pa.Table]:
    """A shard's rows -> (embeddings table of the good rows, errors table of the bad ones)."""
    bad = columns["error"] != ""
    good = ~bad
    num_vectors = columns["num_vectors"][good] if "num_vectors" in columns else None  # multi-vector models
    embeddings = embeddings_table(
        columns["id"][good], columns["source"][good], columns["embedding"][good], fmt, num_vectors
    )
    errors = errors_table(columns["id"][bad], columns["source"][bad], columns["error"][bad])
    return embeddings, errors


def describe_model(model_path: str) -> dict[str, Any]:
    """What the manifest records about the model, read from its ``vembed.json`` without loading weights.

    ``vembed_json_sha256`` is the digest ``VEmbedFactoryPredictor.model_info`` reports. A raw HF directory or hub id
    has no ``vembed.json``: its digest is None and ``normalize`` is the default a model loaded from it gets.
    """
    from vembed.config import load_base_config
    from vembed.model.checkpoint import SPEC_FILE, is_vembed_checkpoint, read_spec

    path = Path(model_path).expanduser()
    if not is_vembed_checkpoint(path):
        located = str(path.resolve()) if path.exists() else model_path
        return {"model_path": located, "vembed_json_sha256": None, "normalize": load_base_config().normalize}
    spec = read_spec(path)
    return {
        "model_path": str(path.resolve()),
        "vembed_json_sha256": hashlib.sha256((path / SPEC_FILE).read_bytes()).hexdigest(),
        "family": spec.family,
        "pooling": spec.pooling,
        "normalize": spec.normalize,
        "embedding_dim": spec.embedding_dim,
        "mrl_dims": spec.mrl_dims,
        "vector_tokens": spec.vector_tokens,
    }


def resolve_actor_pool(
    num_actors: int | None,
    min_actors: int | None,
    max_actors: int | None,
    num_gpus_per_actor: float | None,
    max_decoders: int | None,
    cluster: dict[str, float],
) -> ActorPool:
    """The actor pools for a cluster with ``cluster`` resources (``{"CPU": n, "GPU": m}``).

    Defaults: one GPU per model actor where the cluster has GPUs, an autoscaling pool from 1 actor up to one per
    GPU; on a CPU-only cluster up to half the CPUs. Decode workers scale up to the CPUs the model actors leave.
    """
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    per_actor = num_gpus_per_actor if num_gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    if per_actor > gpus:
        logger.warning(
            "each actor asks for %s GPUs but the cluster has %s now; actors wait for GPU nodes", per_actor, gpus
        )
    if num_actors is not None:
        low = high = num_actors
    else:
        low = min_actors or 1
        capacity = int(gpus // per_actor) if per_actor > 0 else int(cpus // 2)
        high = max_actors or max(low, capacity)
    decoders = max_decoders or max(1, int(cpus - high * ACTOR_CPUS))
    return ActorPool(low, high, per_actor, decoders)


def _check_options(
    modality: str,
    batch_size: int,
    dtype: str,
    dim: int | None,
    fmt: str,
    num_actors: int | None,
    min_actors: int | None,
    max_actors: int | None,
) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r} is not supported; use one of {MODALITIES}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {DTYPES}")
    if dim is not None and (not isinstance(dim, int) or dim < 1):
        raise ValueError(f"dim={dim!r} must be a positive integer (or None for the full size)")
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not supported; use one of {FORMATS}")
    if num_actors is not None and (min_actors is not None or max_actors is not None):
        raise ValueError("num_actors fixes the pool size; pass either num_actors or min_actors/max_actors")


def _pending_items(corpus: Corpus, pending: list[Shard]) -> pa.Table:
    """Rows of the pending shards with their corpus ``position``."""
    parts = [
        corpus.table.slice(shard.start, len(shard)).append_column(
            "position", pa.array(np.arange(shard.start, shard.stop, dtype=np.int64))
        )
        for shard in pending
    ]
    return pa.concat_tables(parts).select(["position", "id", "source"]).combine_chunks()


def _ids_digest(corpus: Corpus) -> str:
    """Digest of the ordered ids: a rerun on a changed input (files added or removed) is refused, not mixed."""
    digest = hashlib.sha256()
    for chunk in corpus.table.column("id").chunks:
        digest.update("".join(f"{item}\n" for item in chunk.to_pylist()).encode())
    return digest.hexdigest()


def _cluster_resources() -> dict[str, float]:
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set by `ray job submit`) connects to the cluster; otherwise a local one starts
    return ray.cluster_resources()


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")
