"""``embed_corpus``: embed a whole image folder or manifest into Parquet shards, resumably, exactly once.

Design. The corpus (ids + sources) is listed by Ray workers in a stable order (:func:`~vembed.batch.sources.list_corpus`:
Ray Data reads a manifest, one task per subdirectory lists a folder) and stays in the object store; the driver only
keeps block row counts. The corpus is cut into fixed-size shards by position (:mod:`vembed.batch.shards`). Shards
already in the output are skipped; the rest stream through one Ray Data pipeline (:mod:`vembed.batch.pipeline`:
decode + preprocess on CPU actors, model actors on an autoscaling pool) whose model actors also write: each writes
the rows it embedded as fragments of their shards and the actor that completes a shard merges it into the shard's
files, atomically (:class:`~vembed.batch.writer.FragmentWriter`). "The file exists" still means "the shard is done",
which is what gives exactly-once output after a crash of the driver or of any node. Ray Data's ``write_parquet`` is
not used because it names files by task, so a crash could leave a shard half-written under a name a rerun cannot
recognise.

The driver plans, then only records progress: order is not preserved, and what it receives is one small report per
(batch, shard) -- rows, errors, whether the shard finished and on which node -- from which it prints rows/s, shards
done, errors and an ETA, and rewrites ``_manifest.json`` as shards finish. Ray Data's streaming executor, whose CPU
grows with the job's duration (it polls), runs in a coordinator task on the driver's node
(:mod:`vembed.batch.coordinator`), not in the driver, which blocks on the reports. The driver's memory and CPU do
not grow with the corpus beyond a few bytes per shard and per listing block.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vembed.batch.coordinator import Coordinator
from vembed.batch.options import DTYPES, FORMATS, MODALITIES
from vembed.batch.pipeline import ACTOR_CPUS, ActorPool, build_dataset, check_instruction, pools_fit
from vembed.batch.progress import JobProgress
from vembed.batch.shards import plan_shards
from vembed.batch.sources import Listing, list_corpus
from vembed.batch.writer import (
    EMBEDDINGS_DIR,
    ERRORS_DIR,
    FragmentWriter,
    OutputExistsError,
    OutputStore,
)
from vembed.modelpath import resolve_source

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: workers write shards; "progress"; the job's "ids_digest" replaces "ids_sha256"


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
        instruction: for models that take one (a VLM's system message, Qwen3-Embedding's query task); None: the
            model's default. A ValueError before anything runs for a model without instructions.

    Returns:
        A summary: totals over the output (``items``, ``embedded``, ``errors``, ``shards``), this run's
        ``rows``, ``shards_written``, ``shards_skipped``, ``seconds``, ``rows_per_s``, ``startup_s`` (until the
        first rows came back), ``steady_rows_per_s`` (after that), ``max_open_shards`` (most shards partly written at
        once), ``writer_nodes`` (shards finished per Ray node), ``coordinator_cpu_s`` (CPU seconds of the task
        that executed the pipeline; None when nothing was pending), ``embedding_dim`` and ``output``.
    """
    _check_options(modality, batch_size, dtype, dim, format, num_actors, min_actors, max_actors)
    resolve_source(model_path)  # a missing model directory fails here, before any Ray work
    started = time.time()
    cluster = _cluster_resources()  # starts or joins Ray: the listing already runs on it
    listing = list_corpus(input, modality, id_column, source_column, image_root)  # type: ignore[arg-type]
    num_items = len(listing)
    shards = plan_shards(num_items, shard_size)
    model = describe_model(model_path)
    check_instruction(model["model_path"], instruction)
    job = {
        "input": listing.origin,
        "modality": modality,
        "id_column": id_column,
        "source_column": source_column,
        "image_root": image_root,
        "items": num_items,
        "ids_digest": ids_digest(listing),
        "shard_size": shard_size,
        "model_path": model["model_path"],
        "vembed_json_sha256": model["vembed_json_sha256"],
        "dtype": dtype,
        "dim": dim,
        "format": format,
        **({"instruction": instruction} if instruction is not None else {}),
    }
    store = OutputStore(output)
    if not overwrite:
        adopt_version_1(store, job, listing)
    done = store.open(job, overwrite)  # refuses a folder holding a different job
    for index in store.fragment_shards() & done:  # rows a retried task wrote after its shard was finished
        store.delete_fragments(shards[index])
    pending = [shard for shard in shards if shard.index not in done]
    manifest = store.read_manifest() or {"version": MANIFEST_VERSION, "job": job, "model": model, "runs": []}
    progress = JobProgress(len(shards), done, sum(len(shard) for shard in pending))
    store.write_manifest({**manifest, "status": "running", "progress": progress.report()})

    coordinator_cpu_s = None
    if pending:
        pool = resolve_actor_pool(num_actors, min_actors, max_actors, num_gpus_per_actor, max_decoders, cluster)
        rows_per_block = block_rows(progress.pending_rows, batch_size, shard_size, pool.max_size + pool.max_decoders)
        items = pending_blocks(listing, done, shard_size, rows_per_block)
        writer = FragmentWriter(store, shard_size, num_items, format)
        wait = pools_fit(pool, modality, cluster)
        if not wait:
            logger.warning(
                "the cluster cannot hold %d model actors and their decoders now; work starts on those that are up",
                pool.min_size,
            )
        dataset = build_dataset(
            items, modality, model["model_path"], pool, batch_size, dtype, dim, writer, instruction, wait
        )
        coordinator_cpu_s = _follow(dataset, store, manifest, progress)
        unfinished = sorted(s.index for s in pending if not store.is_complete(s))
        if unfinished:
            raise RuntimeError(
                f"the pipeline ended with {len(unfinished)} shards incomplete (first: {unfinished[:5]}); rerun to "
                "finish them"
            )

    seconds = time.time() - started
    run = {
        "started": _iso(started),
        "finished": _iso(time.time()),
        "seconds": round(seconds, 3),
        "rows": progress.rows,
        "rows_per_s": round(progress.rows / seconds, 2),
        "shards_written": progress.shards_written,
        "max_open_shards": progress.max_open_shards,
        "writer_nodes": dict(progress.writer_nodes),
        "shards_skipped": len(done),
        "coordinator_cpu_s": None if coordinator_cpu_s is None else round(coordinator_cpu_s, 3),
    }
    if progress.first is not None:
        run["startup_s"] = round(progress.first[0] - progress.started, 3)
        rate = progress.rows_per_s()
        run["steady_rows_per_s"] = None if rate is None else round(rate, 2)
    counts = {
        "items": num_items,
        "embedded": store.count_rows(EMBEDDINGS_DIR),
        "errors": store.count_rows(ERRORS_DIR),
        "shards": len(shards),
    }
    embedding_dim = store.embedding_dim()
    store.write_manifest(
        {
            **manifest,
            "status": "complete",
            "progress": progress.report(),
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
        f"vembed embed: {progress.rows} rows in {seconds:.1f} s ({run['rows_per_s']} rows/s{steady}), "
        f"{counts['errors']} errors in total, {progress.shards_written} shards written, {len(done)} already done "
        f"-> {store.root.uri}",
        flush=True,
    )
    return {**counts, **run, "embedding_dim": embedding_dim, "output": store.root.uri}


#: seconds between manifest rewrites (and printed progress lines) while shards finish
MANIFEST_EVERY_S = 1.0
PRINT_EVERY_S = 10.0


def _follow(dataset: Any, store: OutputStore, manifest: dict[str, Any], progress: JobProgress) -> float | None:
    """Run the pipeline in a coordinator task (:mod:`vembed.batch.coordinator`: Ray Data's executor does not run in
    the driver), folding the writers' reports into ``progress``; rewrite the manifest when shards finish (at most
    every ``MANIFEST_EVERY_S``) and print a progress line every ``PRINT_EVERY_S``. Returns the coordinator's CPU
    seconds."""
    last_manifest = last_print = 0.0
    coordinator = Coordinator(dataset)
    for report in coordinator:
        finished = progress.update(report)
        now = time.monotonic()
        if finished and now - last_manifest >= MANIFEST_EVERY_S:
            store.write_manifest({**manifest, "status": "running", "progress": progress.report()})
            last_manifest = now
        if now - last_print >= PRINT_EVERY_S:
            print(progress.line(), flush=True)
            last_print = now
    return coordinator.cpu_s


def block_rows(pending_rows: int, batch_size: int, shard_size: int, workers: int) -> int:
    """Rows per pipeline input block: about four blocks per decode/model worker so all start at once, a multiple of
    the model batch, at most a shard (and at least a batch): the number of blocks, and so the driver's scheduling
    work, stops growing with the corpus once blocks are shard-sized."""
    target = math.ceil(pending_rows / max(1, 4 * workers))
    rows = max(batch_size, min(target, shard_size))
    return math.ceil(rows / batch_size) * batch_size


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


def pending_blocks(listing: Listing, done: set[int], shard_size: int, rows_per_block: int) -> list[Any]:
    """The rows of the shards not in ``done``, with their corpus ``position``, as refs of Arrow blocks of at most
    ``rows_per_block`` rows (cut at multiples of it), made by one Ray task per listing block; the driver passes each
    task only its block's offset and the done shards the block overlaps.

    Returns once the blocks exist: the pipeline's actors may hold every CPU, and these tasks need one.
    """
    import ray

    refs = []
    for block, offset, count in zip(listing.blocks, listing.offsets, listing.counts, strict=True):
        overlapping = range(offset // shard_size, (offset + count - 1) // shard_size + 1)
        skip = [index for index in overlapping if index in done]
        if len(skip) == len(overlapping):
            continue
        pieces = (offset + count - 1) // rows_per_block - offset // rows_per_block + 1
        cut = ray.remote(_pending_rows).options(num_cpus=0.5, num_returns=pieces)
        made = cut.remote(block, offset, shard_size, skip, rows_per_block)
        refs.extend([made] if pieces == 1 else made)
    if refs:
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
    return refs


def _pending_rows(
    table: pa.Table, offset: int, shard_size: int, skip: list[int], rows_per_block: int
) -> pa.Table | list[pa.Table]:
    positions = np.arange(offset, offset + table.num_rows, dtype=np.int64)
    table = table.select(["id", "source"]).add_column(0, "position", pa.array(positions))
    keep = ~np.isin(positions // shard_size, skip)
    piece = positions // rows_per_block
    parts = [table.filter(pa.array(keep & (piece == k))) for k in range(int(piece[0]), int(piece[-1]) + 1)]
    return parts[0] if len(parts) == 1 else parts


def ids_digest(listing: Listing) -> str:
    """Digest of the ordered ids, computed per block by Ray tasks: the sum of a hash of each (position, id) pair,
    so it does not depend on how the listing is cut into blocks. A rerun on a changed input (files added, removed
    or reordered) is refused, not mixed."""
    import ray

    digest = ray.remote(_block_digest).options(num_cpus=0.5)
    parts = ray.get([digest.remote(b, o) for b, o in zip(listing.blocks, listing.offsets, strict=True)])
    return f"{sum(parts) % (1 << 128):032x}"


def adopt_version_1(store: OutputStore, job: dict[str, Any], listing: Listing) -> None:
    """Resume a folder written by vembed before the workers wrote shards (manifest version 1) if it holds ``job``.

    Safe because version 1 used the same shards (positions ``k * shard_size`` onwards of the same corpus order), file
    names and write-then-rename protocol, so each of its shard files is complete and is what this version would
    write. Its job record differs only in the ids: the sha256 of the ordered ids, recomputed here by streaming the
    listing's blocks through the driver one at a time (once, on the first rerun). A match rewrites the manifest as
    this version's (runs kept); any other difference raises :class:`OutputExistsError` naming it.
    """
    previous = store.read_manifest()
    if previous is None or previous.get("version") != 1:
        return
    theirs = previous.get("job", {})
    ours = {key: value for key, value in job.items() if key != "ids_digest"}
    differs = sorted(k for k in (set(ours) | set(theirs)) - {"ids_sha256"} if theirs.get(k) != ours.get(k))
    if not differs and theirs.get("ids_sha256") != ids_sha256(listing):
        differs = ["ids"]
    if differs:
        raise OutputExistsError(
            f"{store.root.uri} holds the output of a different job, written by an older vembed (manifest version 1; "
            f"differs in: {', '.join(differs)}); pass --overwrite to start over or pick another output folder"
        )
    store.write_manifest({**previous, "version": MANIFEST_VERSION, "job": job, "upgraded_from_version": 1})


def ids_sha256(listing: Listing) -> str:
    """Manifest version 1's digest of the ordered ids: sha256 over ``id + "\\n"`` for every id in corpus order."""
    import ray

    digest = hashlib.sha256()
    for block in listing.blocks:  # in order, one block in the driver at a time
        digest.update("".join(f"{item}\n" for item in ray.get(block).column("id").to_pylist()).encode())
    return digest.hexdigest()


def _block_digest(table: pa.Table, offset: int) -> int:
    total = 0
    for i, item in enumerate(table.column("id").to_pylist()):
        total += int.from_bytes(hashlib.blake2b(f"{offset + i}\n{item}".encode(), digest_size=16).digest(), "little")
    return total % (1 << 128)


def _cluster_resources() -> dict[str, float]:
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set by `ray job submit`) connects to the cluster; otherwise a local one starts
    return ray.cluster_resources()


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")
